"""Class 5: no silent garbage. Non-finite weights make generation raise NumericsError pointing at
`dsgraph check-weights`, which names the tensors; corrupt tuning caches are dropped with a warning, never shipped;
tuned configs are keyed by the Triton version."""
import json

import dsgraph.models as models
import pytest
import torch
from dsgraph.backends.triton import autotune, tuned
from dsgraph.models.check_weights import check_weights, count_nonfinite
from safetensors.torch import save_file

import dsgraph
from dsgraph.app.cli import main
from dsgraph.errors import NumericsError
from dsgraph.version import tool_version
from hostile.helpers import copy, write_checkpoint

NAN, INF = float("nan"), float("inf")


# which weight, and how: each makes the logits non-finite for the prompt below
POISON = {
    "final norm NaN": ("deepseek-llm-tiny", "model.norm.weight", NAN, None),
    "layer norm Inf": ("deepseek-llm-tiny", "model.layers.0.input_layernorm.weight", INF, None),
    "embedding row": ("deepseek-llm-tiny", "model.embed_tokens.weight", NAN, 3),
    "lm_head NaN": ("deepseek-llm-tiny", "lm_head.weight", NAN, slice(None)),
    "every expert": ("deepseek-moe-tiny", None, NAN, slice(None)),
}


def _poisoned_model(case):
    preset, name, value, rows = POISON[case]
    m = models.build_model(preset, seed=0)
    names = [name] if name else [k for k in m.graph.params() if ".experts." in k and "down_proj" in k]
    for n in names:
        t = m.weights[n].clone()
        if rows is None:
            t.view(-1)[t.numel() // 2] = value
        else:
            t[rows] = value
        m.weights.set(n, lambda t=t: t)
    return m, names


@pytest.mark.parametrize("case", sorted(POISON))
def test_nonfinite_weights_stop_generation_with_a_named_error(case):
    m, _ = _poisoned_model(case)
    exe = dsgraph.compile(m, backend="eager")
    with pytest.raises(NumericsError, match="dsgraph check-weights"):
        exe.generate([[3, 5, 7]], max_new_tokens=4)


@pytest.mark.parametrize("case", ["final norm NaN", "embedding row", "every expert"])
def test_check_weights_names_the_tensor(tmp_path, case, capsys):
    preset, name, value, rows = POISON[case]
    m, names = _poisoned_model(case)
    ckpt = write_checkpoint(tmp_path / "ckpt", preset, shards=2,
                            edit=lambda ts: [ts.update({n: m.weights[n]}) for n in names])
    assert main(["check-weights", str(ckpt), "-q"]) == 1
    out = capsys.readouterr().out
    assert all(n in out for n in names) and f"{len(names)} hold NaN or Inf" in out


def test_check_weights_clean_checkpoint_and_artifact(tmp_path, eager_artifact, capsys):
    assert main(["check-weights", str(write_checkpoint(tmp_path / "ok"))]) == 0
    assert "all finite" in capsys.readouterr().out
    assert main(["check-weights", str(copy(eager_artifact, tmp_path))]) == 0
    assert "all finite" in capsys.readouterr().out


def test_check_weights_reads_fp8_nan_bytes(tmp_path):
    w = torch.randn(8, 8).to(torch.float8_e4m3fn)
    w.view(torch.uint8)[2, 3] = 0x7F  # the e4m3 NaN encoding
    scale = torch.ones(1, 1)
    scale[0, 0] = INF
    save_file({"w": w, "w_scale_inv": scale, "ids": torch.arange(4)}, str(tmp_path / "m.safetensors"))
    found = check_weights(tmp_path / "m.safetensors", progress=False)
    assert {(f.name, f.nan, f.inf) for f in found} == {("w", 1, 0), ("w_scale_inv", 0, 1)}
    assert count_nonfinite(torch.arange(5)) == (0, 0)


# tuning cache ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"k": true}', '{"k": null}', "\x00\x01"])
def test_corrupt_tuned_table_is_dropped_with_a_warning(cache, text):
    path = tuned.table_path("k")
    path.write_text(text)
    with pytest.warns(UserWarning, match="corrupt"):
        assert tuned.read_table(path) == {}
    assert not path.exists()


def test_corrupt_tuned_table_is_never_shipped(cache, tmp_path):
    tuned.table_path("garbage").write_text("{oops")
    tuned.write_table(tuned.table_path("good"), {"cpu|x": {"BLOCK": 16}})
    exe = dsgraph.compile(models.build_model("deepseek-llm-tiny", seed=1), backend="triton", device="cpu")
    with pytest.warns(UserWarning, match="corrupt"):
        art = exe.save(tmp_path / "art")
    shipped = sorted(p.name for p in (art / "backend/main/tuned").iterdir())
    assert shipped == ["good.json"]
    assert json.loads((art / "backend/main/kernels.json").read_text())["tuned"] == ["good"]
    assert dsgraph.load_artifact(art)(torch.tensor([[1, 2]])).isfinite().all()


def test_tuned_configs_are_keyed_by_the_triton_version(cache, monkeypatch):
    monkeypatch.setattr(autotune, "_MEMO", {})
    cands = [{"BLOCK": 16}, {"BLOCK": 32}]
    key = autotune._entry_key((1, 2))
    assert f"triton {tool_version('triton')}" in key
    other = key.replace(f"triton {tool_version('triton')}", "triton 0.0.1")
    tuned.write_table(tuned.table_path("k"), {other: {"BLOCK": 32}})
    assert autotune.cached("k", (1, 2), cands) is None  # another Triton's timing is not reused
    monkeypatch.setattr(autotune, "_MEMO", {})
    tuned.write_table(tuned.table_path("k"), {key: {"BLOCK": 32}})
    assert autotune.cached("k", (1, 2), cands) == {"BLOCK": 32}
