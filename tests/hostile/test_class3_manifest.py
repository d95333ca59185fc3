"""Class 3: the manifest is not trusted. Its schema is checked first, every file the loader opens is listed and
verified, the graph hash is checked, and a wrong backend flag or a garbage compiled module is a named error."""
import hashlib
import json

import pytest
import torch
from dsgraph.backends import available_backends
from safetensors.torch import load_file, save_file

import dsgraph
from dsgraph.app.cli import main
from dsgraph.errors import ArtifactError, DSGraphError
from hostile.helpers import copy, resign


def _edit(m, key, value):
    if value is KeyError:
        m.pop(key)
    else:
        m[key] = value


@pytest.mark.parametrize("key,value,match", [
    ("files", KeyError, "required key 'files' is missing"),
    ("files", {}, "does not list the required files"),
    ("files", [], "key 'files' must be"),
    ("graph_hash", KeyError, "required key 'graph_hash'"),
    ("graph_hash", "abc", "not a sha256"),
    ("format", "dsgraph.other", "format is"),
    ("format_version", "1", "format_version' must be an integer"),
    ("format_version", 0, "not a version this dsgraph wrote"),
    ("format_version", 99, "newer than this dsgraph reads"),
    ("backend", 3, "key 'backend' must be"),
    ("backend", "no_such_backend", "unknown backend"),
    ("device", "tpu", "device 'tpu'"),
    ("dtype", "int8", "dtype 'int8'"),
    ("model", {"name": "x"}, "'model' must hold"),
    ("passes", "all", "key 'passes' must be"),
    ("passes", [1, None], "must list pass names"),
])
def test_manifest_schema(eager_artifact, tmp_path, key, value, match):
    art = copy(eager_artifact, tmp_path)
    resign(art, lambda m: _edit(m, key, value))
    with pytest.raises(ArtifactError, match=match):
        dsgraph.load_artifact(art)


@pytest.mark.parametrize("entry", [{"sha256": "0" * 64}, {"bytes": 3}, "abc", {"sha256": "xyz", "bytes": 1},
                                   {"sha256": "0" * 64, "bytes": -1}, {"sha256": "0" * 64, "bytes": True}])
def test_file_entries_typed(eager_artifact, tmp_path, entry):
    art = copy(eager_artifact, tmp_path)
    resign(art, lambda m: m["files"].update({"graph.json": entry}))
    with pytest.raises(ArtifactError, match="file entry 'graph.json' must be"):
        dsgraph.load_artifact(art)


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '"s"', "\xff\xfe"])
def test_manifest_not_an_object(eager_artifact, tmp_path, text):
    art = copy(eager_artifact, tmp_path)
    (art / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ArtifactError, match="manifest.json"):
        dsgraph.load_artifact(art)


def test_graph_hash_is_checked(eager_artifact, tmp_path):
    art = copy(eager_artifact, tmp_path)
    g = json.loads((art / "graph.json").read_text())
    g["name"] = "edited"
    (art / "graph.json").write_text(json.dumps(g))
    resign(art)
    with pytest.raises(ArtifactError, match="graph_hash"):
        dsgraph.load_artifact(art)


@pytest.mark.parametrize("damage", ["not json", "wrong shape", "garbage weights"])
def test_resigned_damage_inside_files_is_named(eager_artifact, tmp_path, damage):
    art = copy(eager_artifact, tmp_path)
    if damage == "not json":
        (art / "graph.json").write_text("{oops")
    elif damage == "garbage weights":
        (art / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    else:
        g = json.loads((art / "graph.json").read_text())
        g["inputs"][0]["type"]["shape"] = "oops"
    if damage == "wrong shape":
        (art / "graph.json").write_text(json.dumps(g))
        g_hash = hashlib.sha256(json.dumps(g, sort_keys=True).encode()).hexdigest()
        resign(art, lambda m: m.update(graph_hash=g_hash))
    else:
        resign(art)
    with pytest.raises(ArtifactError, match="graph.json|weights.safetensors"):
        dsgraph.load_artifact(art)


def test_deleted_manifest_is_named(eager_artifact, tmp_path, capsys):
    art = copy(eager_artifact, tmp_path)
    (art / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        dsgraph.load(str(art))
    assert main(["run", str(art)]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


@pytest.mark.parametrize("flag,want", [(("--backend", "triton"), "compiled for backend 'eager', not 'triton'"),
                                       (("--dtype", "bfloat16"), "compiled for float32, not --dtype bfloat16")])
def test_run_with_another_backend_or_dtype_is_an_error(eager_artifact, capsys, flag, want):
    assert main(["run", str(eager_artifact), *flag, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert want in err and len([line for line in err.strip().splitlines() if "error" in line]) == 1


def test_corrupt_tuned_table_in_artifact(triton_artifact, cache, tmp_path):
    art = copy(triton_artifact, tmp_path)
    listing = json.loads((art / "backend/main/kernels.json").read_text())
    (art / "backend/main/tuned").mkdir(exist_ok=True)
    (art / "backend/main/tuned/bad.json").write_text('{"cpu|x": [1, 2')
    listing["tuned"] = ["bad"]
    (art / "backend/main/kernels.json").write_text(json.dumps(listing))
    resign(art)
    with pytest.raises(ArtifactError, match="bad.json is not a table of tuned configs"):
        dsgraph.load_artifact(art)


@pytest.mark.skipif("tvm" not in available_backends("cpu"), reason="tvm backend unavailable here")
@pytest.mark.parametrize("payload", [b"", b"garbage, not a shared library", b"\x7fELF" + b"\x00" * 64])
def test_garbage_tvm_module_is_named(tmp_path, payload):
    import dsgraph.models as models
    exe = dsgraph.compile(models.build_model("deepseek-llm-tiny", seed=1), backend="tvm", device="cpu")
    art = exe.save(tmp_path / "tvm")
    (art / "backend/main/module.so").write_bytes(payload)
    resign(art)
    with pytest.raises(DSGraphError, match="module.so|compiled code"):
        dsgraph.load_artifact(art)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bfloat16, torch.float64])
def test_resigned_weights_of_another_dtype_refused(eager_artifact, tmp_path, dtype):
    art = copy(eager_artifact, tmp_path)
    tensors = load_file(str(art / "weights.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(dtype)
    save_file(tensors, str(art / "weights.safetensors"))
    resign(art)
    with pytest.raises(ArtifactError, match="weight model.norm.weight is"):
        dsgraph.load_artifact(art)


@pytest.mark.parametrize("key,value", [("vocab_size", "lots"), ("max_position_embeddings", [1]),
                                       ("vocab_size", -3)])
def test_resigned_graph_meta_the_runtime_reads_is_typed(eager_artifact, tmp_path, key, value):
    art = copy(eager_artifact, tmp_path)
    g = json.loads((art / "graph.json").read_text())
    g["meta"][key] = value
    (art / "graph.json").write_text(json.dumps(g))
    digest = hashlib.sha256(json.dumps(g, sort_keys=True).encode()).hexdigest()
    resign(art, lambda m: m.update(graph_hash=digest))
    with pytest.raises(ArtifactError, match=f"meta.{key} must be a positive integer"):
        dsgraph.load_artifact(art)
