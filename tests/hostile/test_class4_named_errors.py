"""Class 4: bad files and arguments give the project's errors naming the key, file or pass — never a raw
traceback, never a hang, and the CLI prints one line and exits 2."""
import json
import time
from dataclasses import dataclass

import dsgraph.models as models
import pytest
import torch
from dsgraph.passes.base import Pass

import dsgraph
from dsgraph import passes
from dsgraph.app.cli import main
from dsgraph.errors import CheckpointError, ConfigError, InputError, PassError, VerifyError
from dsgraph.serialize import save_graph
from hostile.helpers import write_checkpoint


@pytest.fixture(scope="module")
def exe():
    return dsgraph.compile(models.build_model("deepseek-llm-tiny", seed=1), backend="eager")


# config.json ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("num_hidden_layers", "three"), ("hidden_size", "64"), ("num_hidden_layers", 1e8), ("num_hidden_layers", 10**8),
    ("vocab_size", -1), ("vocab_size", 0), ("vocab_size", 2**40), ("rms_norm_eps", "tiny"),
    ("tie_word_embeddings", "false"), ("num_attention_heads", 3), ("num_key_value_heads", 3),
    ("rope_theta", float("nan")), ("rope_scaling", {"type": "linear", "factor": "2"}), ("model_type", ["llama"]),
    ("intermediate_size", None), ("max_position_embeddings", [4096]), ("head_dim", 0), ("rope_scaling", "yarn"),
])
def test_config_values_are_typed(tmp_path, key, value):
    ckpt = write_checkpoint(tmp_path / "ckpt", config_edit=lambda c: c.update({key: value}))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=key if value is not None else "intermediate_size"):
        dsgraph.load(str(ckpt))
    assert time.perf_counter() - t0 < 10, "refused before building anything"


@pytest.mark.parametrize("text", ["[]", '"x"', "{", "", "null"])
def test_config_json_not_an_object(tmp_path, text):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    (ckpt / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="config.json"):
        dsgraph.load(str(ckpt))


# safetensors and the index ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "huge header", "directory"])
def test_damaged_shard_is_named(tmp_path, damage):
    ckpt = write_checkpoint(tmp_path / "ckpt", shards=2)
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    if damage == "directory":
        shard.unlink()
        shard.mkdir()
    else:
        shard.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"\x00garbage" * 9,
                           "huge header": (2**62).to_bytes(8, "little") + b"{}"}[damage])
    with pytest.raises(CheckpointError, match=shard.name):
        dsgraph.load(str(ckpt))


@pytest.mark.parametrize("weight_map,match", [
    ([], "must map tensor names"), ({"a": 3}, "must map tensor names"), ("x", "must map tensor names"),
    ({"a": "../../outside.safetensors"}, "not a plain file name"), ({"a": "/etc/x.safetensors"}, "not a plain"),
    ({"a": "sub/x.safetensors"}, "not a plain file name"), (None, "must map tensor names"),
])
def test_hostile_index(tmp_path, weight_map, match):
    ckpt = write_checkpoint(tmp_path / "ckpt", shards=2)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=match):
        dsgraph.load(str(ckpt))


# graph JSON -------------------------------------------------------------------------------------------------------
def _graph_json(tmp_path):
    path = tmp_path / "g.json"
    save_graph(models.build_model("deepseek-llm-tiny", weights=False).graph, path)
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("edit", [
    lambda g: g.pop("nodes"), lambda g: g.update(nodes={}), lambda g: g["nodes"][0].pop("op"),
    lambda g: g["nodes"][0].update(inputs=["nope"]), lambda g: g.update(outputs={"logits": "nope"}),
    lambda g: g["inputs"][0].update(type={"shape": "x", "dtype": "float32"}),
    lambda g: g["inputs"][0].update(type={"shape": [1], "dtype": "complex1024"}),
    lambda g: g["nodes"][0]["attrs"].update(eps="tiny"), lambda g: g["nodes"][1].update(op="no.such_op"),
    lambda g: g.update(meta=[]), lambda g: g["nodes"][2].update(outputs=[{"name": 3}]),
    lambda g: g.update(version="2"), lambda g: g.update(inputs=None),
])
def test_malformed_graph_json_is_named(tmp_path, edit):
    path, g = _graph_json(tmp_path)
    edit(g)
    path.write_text(json.dumps(g))
    with pytest.raises(VerifyError, match="g.json"):
        dsgraph.load(str(path))


@pytest.mark.parametrize("text", ["{", "", "[1, 2]", "null"])
def test_graph_file_not_json(tmp_path, text):
    (tmp_path / "g.json").write_text(text)
    with pytest.raises(VerifyError, match="g.json"):
        dsgraph.load(str(tmp_path / "g.json"))


# passes -----------------------------------------------------------------------------------------------------------
@dataclass
class Broken(Pass):
    name = "broken_for_test"
    description = "raises a raw error"
    error: type = ZeroDivisionError

    def run(self, graph, weights):
        raise self.error("boom")


@pytest.mark.parametrize("error", [ZeroDivisionError, KeyError, TypeError, AttributeError])
def test_raw_error_in_a_pass_names_it(error):
    g = models.build_model("deepseek-llm-tiny", weights=False).graph
    with pytest.raises(PassError, match="pass 'broken_for_test' raised"):
        passes.run_pipeline(g, None, ["cse", Broken(error)])


# generate arguments -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    # (a list of strings is a batch of text prompts and ragged id lists are a ragged batch: both valid)
    ({"prompt_ids": [1, "2"]}, "integer"), ({"prompt_ids": [1.0, 2.0]}, "integer"),
    ({"prompt_ids": [[1, 2], []]}, "empty"), ({"prompt_ids": [True]}, "integer"),
    ({"prompt_ids": [10**20]}, "outside any vocabulary"), ({"prompt_ids": [[1, 2], "x"]}, "integer tensor"),
    ({"max_new_tokens": "2"}, "max_new_tokens"), ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": True}, "max_new_tokens"),
    ({"draft_depth": 0, "speculative": "mtp"}, "draft_depth"), ({"speculative": "beam"}, "speculative"),
])
def test_generate_arguments(exe, kwargs, match):
    kwargs = {"prompt_ids": [1, 2, 3], "max_new_tokens": 2, **kwargs}
    with pytest.raises(InputError, match=match):
        exe.generate(**kwargs)


# the command line -------------------------------------------------------------------------------------------------
def _one_line_error(capsys, argv, code=2):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, err
    assert "Traceback" not in "\n".join(err) and err
    return err


@pytest.mark.parametrize("argv", [
    ["run", "deepseek-llm-tiny", "--prompt-ids", ""], ["run", "deepseek-llm-tiny", "--prompt-ids", "1,x"],
    ["run", "deepseek-llm-tiny", "--max-new-tokens", "0"], ["bench", "deepseek-llm-tiny", "--repeats", "-2"],
    ["bench", "deepseek-llm-tiny", "--warmup", "-1"], ["run", "deepseek-llm-tiny", "--draft-depth", "x"],
])
def test_cli_argument_refusals(capsys, argv):
    _one_line_error(capsys, argv)


@pytest.mark.parametrize("make", ["missing dir", "a file as dir", "dir as file"])
def test_cli_unwritable_outputs_refused_before_work(tmp_path, capsys, make):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    cases = {"missing dir": [["bench", "deepseek-llm-tiny", "--json", str(tmp_path / "no" / "x.json")],
                             ["export", "deepseek-llm-tiny", "--onnx", str(tmp_path / "no" / "m.onnx")]],
             "a file as dir": [["compile", "deepseek-llm-tiny", "-o", str(tmp_path / "f" / "art")],
                               ["compile", "deepseek-llm-tiny", "--emit-dir", str(tmp_path / "f")]],
             "dir as file": [["bench", "deepseek-llm-tiny", "--plot", str(tmp_path / "d")],
                             ["export", "deepseek-llm-tiny", "--onnx", str(tmp_path / "d")]]}
    for argv in cases[make]:
        t0 = time.perf_counter()
        err = _one_line_error(capsys, argv)
        assert len(err) == 1 and time.perf_counter() - t0 < 5


def test_cli_debug_shows_the_traceback(capsys):
    assert main(["show", "no-such-model", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_bench_unknown_backend_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DSGRAPH_CACHE_DIR", str(tmp_path))
    rc = main(["bench", "deepseek-llm-tiny", "--backends", "eager,nope", "--op", "rmsnorm", "--repeats", "1",
               "--warmup", "0", "--context", "4", "--batch", "1", "--json", str(tmp_path / "b.json")])
    assert rc == 1
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["status"] for r in rows if r["backend"] == "nope"] == ["failed"] * len(
        [r for r in rows if r["backend"] == "eager"])
    assert torch.isfinite(torch.tensor([r["median_ms"] for r in rows if r["backend"] == "eager"])).all()
