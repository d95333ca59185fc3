"""Fuzz: random hostile values in config.json, graph JSON and the artifact manifest give only dsgraph errors
(or a valid result) — never a raw exception, never a hang (hypothesis deadlines bound each example)."""
import copy
import json

import dsgraph.models as models
import pytest
from dsgraph.models.config import from_hf
from dsgraph.models.model import build_graph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsgraph.errors import DSGraphError
from dsgraph.runtime.manifest import check_schema
from dsgraph.serialize import graph_from_json, graph_to_json

HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.sampled_from([0, 1, 2, 3, 7, 64, 1025, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.sampled_from(["64", "three", "../x"]),
    st.lists(st.integers(0, 8), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(0, 4), max_size=2),
)
FAST = settings(max_examples=40, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PRESETS = ["deepseek-llm-tiny", "deepseek-moe-tiny", "deepseek-v3-tiny", "deepseek-v2-lite-tiny"]


@pytest.mark.parametrize("preset", PRESETS)
@FAST
@given(data=st.data())
def test_config_fuzz_gives_only_dsgraph_errors(preset, data):
    cfg = models.preset_config(preset)
    for key in data.draw(st.lists(st.sampled_from(sorted(cfg)), min_size=1, max_size=3, unique=True)):
        cfg[key] = data.draw(HOSTILE)
    try:
        build_graph(from_hf(json.loads(json.dumps(cfg)), "fuzzed config.json"), mtp=False)
    except DSGraphError:
        pass


@pytest.fixture(scope="module")
def graph_json():
    return graph_to_json(models.build_model("deepseek-v3-tiny", weights=False).graph)


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON tree, for picking a place to mutate."""
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


@FAST
@given(data=st.data())
def test_graph_json_fuzz_gives_only_dsgraph_errors(graph_json, data):
    g = copy.deepcopy(graph_json)
    paths = [p for p in _paths(g) if p][:4000]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = g
        try:
            for k in path[:-1]:
                parent = parent[k]
            parent[path[-1]] = data.draw(HOSTILE)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced an ancestor
    try:
        graph_from_json(json.loads(json.dumps(g)), "fuzzed graph.json").verify()
    except DSGraphError:
        pass


@FAST
@given(key=st.sampled_from(["format", "format_version", "backend", "device", "dtype", "model", "graph_hash",
                            "passes", "files"]), value=HOSTILE)
def test_manifest_fuzz_gives_only_dsgraph_errors(tmp_path, key, value):
    m = {"format": "dsgraph.artifact", "format_version": 1, "dsgraph_version": "0", "backend": "eager",
         "device": "cpu", "dtype": "float32", "model": {"name": "x", "config": {}}, "graph_hash": "0" * 64,
         "passes": [], "files": {"graph.json": {"sha256": "0" * 64, "bytes": 1},
                                 "weights.safetensors": {"sha256": "0" * 64, "bytes": 1}}}
    m[key] = value
    try:
        check_schema(json.loads(json.dumps(m)), tmp_path / "manifest.json")
    except DSGraphError:
        pass
