"""The torch_compile comparison backend: same numbers as eager, graph breaks named in the report."""
import dsgraph.models as models
import pytest
import torch
from dsgraph.backends import get_backend

import dsgraph
from dsgraph.app.bench.workloads import build_op, random_inputs
from dsgraph.app.check import rel_err
from dsgraph.errors import InputError
from dsgraph.interpreter import run

pytestmark = pytest.mark.skipif(get_backend("torch_compile").available("cpu") is not None,
                                reason="torch_compile needs a C++ compiler on CPU")


def test_inductor_matches_eager_prefill_and_decode():
    model = models.build_model("deepseek-llm-tiny", mtp=False)
    exe = dsgraph.compile(model, backend="torch_compile", passes="none")
    ref = dsgraph.compile(model, backend="eager")
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    got, state = exe.prefill(ids)
    want, ref_state = ref.prefill(ids)
    assert rel_err(got, want) <= 1e-4
    nxt = want[:, -1:].argmax(-1)
    assert rel_err(exe.decode(nxt, state)[0], ref.decode(nxt, ref_state)[0]) <= 1e-4
    report = exe.report()
    assert "torch.compile(inductor, mode=default)" in report and "graph breaks: none" in report


def test_data_dependent_moe_runs_eagerly_and_is_reported():
    """The per-expert MoE reference loops over `.tolist()` counts: traced, each routing pattern would recompile,
    so it runs eagerly between compiled regions, and the report lists it as a fallback with the reason."""
    cfg = models.build_model("deepseek-moe-tiny", weights=False).config
    w = build_op("moe", cfg, "float32", {"B": 3, "S": 1})
    compiled = get_backend("torch_compile").compile(w.graph, w.weights, "cpu", compiler="aot_eager")
    inputs = random_inputs(w.graph, w.env, 0)
    assert rel_err(compiled.run(inputs)["out"], run(w.graph, w.weights, inputs)["out"]) <= 1e-5
    assert [k.op for k in compiled.report.fallbacks] == ["moe.experts"]
    assert "host-side token counts" in compiled.report.fallbacks[0].note
    assert "graph breaks: only around moe.experts (run eagerly)" in compiled.report.notes


@pytest.mark.parametrize("opts,match", [({"mode": "fastest"}, "not one of"),
                                        ({"mode": "reduce-overhead"}, "CUDA graphs"),
                                        ({"fullgraph": True}, "unknown options")])
def test_bad_options_are_named(opts, match):
    model = models.build_model("deepseek-llm-tiny", mtp=False)
    with pytest.raises(InputError, match=match):
        dsgraph.compile(model, backend="torch_compile", passes="none", **opts)
