"""The Hugging Face loader on its own: errors that name the key/file, MTP handling, FP8 kept or dequantised,
laziness, progress, config spellings. Checkpoints here are written from the tiny presets' random weights
(parity with transformers is tests/test_hf_parity.py)."""
from __future__ import annotations

import json

import dsgraph.models as models
import hf_fixtures as fx
import pytest
import torch
from dsgraph.models import hf_shards

import dsgraph
from dsgraph.errors import CheckpointError, ConfigError

_one_thread = pytest.fixture(scope="module", autouse=True)(fx.one_thread)
IDS = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
write_preset = fx.write_preset


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# errors ----------------------------------------------------------------------------------------------------------
def test_wrong_shape_is_named(tmp_path):
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    write_preset(tmp_path, edit=lambda t: t.update({key: torch.randn(64, 30)}))
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight: checkpoint \[64, 30\], model expects \[128, 32\]"):
        models.load_checkpoint(tmp_path)


def test_missing_weight_is_named(tmp_path):
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    write_preset(tmp_path, edit=lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"1 missing weights[\s\S]*experts\.5\.up_proj\.weight \[32, 64\]"):
        models.load_checkpoint(tmp_path)


def test_unexpected_key_is_named(tmp_path):
    write_preset(tmp_path, edit=lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": torch.randn(4, 4)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected weights[\s\S]*model\.layers\.0\.mlp\.extra_proj"):
        models.load_checkpoint(tmp_path)


def test_all_problems_reported_together_and_truncated(tmp_path):
    def edit(t):
        for e in range(8):
            for p in ("gate", "up", "down"):
                t.pop(f"model.layers.1.mlp.experts.{e}.{p}_proj.weight")
        t["not_a_weight"] = torch.zeros(1)
        t["model.norm.weight"] = torch.ones(65)
    write_preset(tmp_path, edit=edit)
    with pytest.raises(CheckpointError) as err:
        models.load_checkpoint(tmp_path)
    msg = str(err.value)
    assert "24 missing weights" in msg and "... and 4 more" in msg
    assert "1 unexpected weights" in msg and "not_a_weight" in msg
    assert "model.norm.weight: checkpoint [65], model expects [64]" in msg


def test_unknown_model_type_is_named(tmp_path):
    write_preset(tmp_path, config_edit=lambda c: c.update(model_type="gpt_neox"))
    with pytest.raises(ConfigError, match="unknown model_type 'gpt_neox'"):
        models.load_checkpoint(tmp_path)


@pytest.mark.parametrize("key", ["hidden_size", "kv_lora_rank", "n_routed_experts", "model_type"])
def test_missing_config_key_is_named(tmp_path, key):
    write_preset(tmp_path, config_edit=lambda c: c.pop(key))
    with pytest.raises(ConfigError, match=f"missing .*'{key}'"):
        models.load_checkpoint(tmp_path)


def test_directory_problems_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        models.load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(models.preset_config("deepseek-llm-tiny")))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        models.load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        models.load_checkpoint(tmp_path)


def test_index_naming_absent_shard(tmp_path):
    write_preset(tmp_path, "deepseek-llm-tiny", shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        models.load_checkpoint(tmp_path)


def test_fp8_weight_without_scale(tmp_path):
    key = "model.layers.0.self_attn.q_a_proj.weight"
    write_preset(tmp_path, "deepseek-v3-fp8-tiny", edit=lambda t: t.pop(key + "_scale_inv"))
    with pytest.raises(CheckpointError, match=r"q_a_proj\.weight: checkpoint dtype float8_e4m3fn \(an FP8 weight "
                                              r"without its weight_scale_inv\)"):
        models.load_checkpoint(tmp_path)


def test_fp8_scale_of_wrong_grid(tmp_path):
    key = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    write_preset(tmp_path, "deepseek-v3-fp8-tiny", edit=lambda t: t.update({key: torch.ones(2, 3)}))
    with pytest.raises(CheckpointError, match=r"q_a_proj\.weight: .*scales \[2, 3\].*scales \[2, 4\]"):
        models.load_checkpoint(tmp_path)


# MTP ---------------------------------------------------------------------------------------------------------------
def test_mtp_absent_builds_without_it_and_says_so(tmp_path):
    write_preset(tmp_path, edit=lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.3.")])
    with pytest.warns(UserWarning, match="no model.layers.3.. weights; built without the MTP branch"):
        m = models.load_checkpoint(tmp_path)
    assert "mtp_ids" not in m.graph.inputs
    assert "without the MTP branch" in m.graph.meta["checkpoint"]["notes"][0]


def test_mtp_false_ignores_mtp_keys(tmp_path):
    write_preset(tmp_path)
    m = models.load_checkpoint(tmp_path, mtp=False)
    assert "mtp_ids" not in m.graph.inputs and not any(k.startswith("model.layers.3.") for k in m.weights)
    full = models.load_checkpoint(tmp_path)
    assert "mtp_ids" in full.graph.inputs and "model.layers.3.eh_proj.weight" in full.weights


def test_mtp_keys_without_mtp_in_config_are_unexpected(tmp_path):
    write_preset(tmp_path, config_edit=lambda c: c.update(num_nextn_predict_layers=0))
    with pytest.raises(CheckpointError, match=r"unexpected weights[\s\S]*model\.layers\.3\.eh_proj\.weight"):
        models.load_checkpoint(tmp_path)


# FP8, laziness, progress, dtype ------------------------------------------------------------------------------------
def test_fp8_dequantised_on_load_equals_kept_fp8(tmp_path):
    write_preset(tmp_path, "deepseek-v3-fp8-tiny", shards=2)
    deq = models.load_checkpoint(tmp_path, mtp=False)
    kept = models.load_checkpoint(tmp_path, mtp=False, keep_fp8=True)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert deq.config.fp8_block_size is None and kept.config.fp8_block_size == (16, 16)
    assert deq.weights[name].dtype == torch.float32 and kept.weights[name].dtype == torch.float8_e4m3fn
    assert not any(n.op == "dequant_fp8" for n in deq.graph.nodes)
    a = dsgraph.compile(deq, backend="eager")(IDS)
    b = dsgraph.compile(kept, backend="eager")(IDS)
    assert _rel(a, b) < 1e-6


def test_loading_is_lazy(tmp_path, monkeypatch):
    write_preset(tmp_path)
    reads = []
    real = hf_shards.Shards.read
    monkeypatch.setattr(hf_shards.Shards, "read", lambda self, key, index=None: reads.append(key) or real(
        self, key, index))
    m = models.load_checkpoint(tmp_path)
    assert reads == [] and all(m.weights.is_lazy(k) for k in m.weights)
    assert m.weights["model.layers.1.mlp.experts.2.gate_proj.weight"].shape == (32, 64)
    assert reads == ["model.layers.1.mlp.experts.2.gate_proj.weight"]


def test_fused_experts_are_sliced_lazily(tmp_path, monkeypatch):
    """transformers-5 fused [E, 2I, D] / [E, D, I] tensors: each expert reads only its slice."""
    def fuse(t):
        for layer in (1, 2, 3):
            p = f"model.layers.{layer}.mlp.experts"
            t[f"{p}.gate_up_proj"] = torch.stack([torch.cat([t.pop(f"{p}.{e}.gate_proj.weight"),
                                                             t.pop(f"{p}.{e}.up_proj.weight")]) for e in range(8)])
            t[f"{p}.down_proj"] = torch.stack([t.pop(f"{p}.{e}.down_proj.weight") for e in range(8)])
    write_preset(tmp_path, edit=fuse)
    ref = models.build_model("deepseek-v3-tiny", seed=0)
    m = models.load_checkpoint(tmp_path)
    for name in ("model.layers.2.mlp.experts.6.gate_proj.weight", "model.layers.2.mlp.experts.6.up_proj.weight",
                 "model.layers.3.mlp.experts.0.down_proj.weight"):
        assert torch.equal(m.weights[name], ref.weights[name])
    slices = []
    real = hf_shards.Shards.read
    monkeypatch.setattr(hf_shards.Shards, "read", lambda self, key, index=None: slices.append(index) or real(
        self, key, index))
    m.weights["model.layers.1.mlp.experts.4.up_proj.weight"]
    assert slices == [(4, slice(32, 64))]


def test_a_forced_progress_bar_shows_a_sharded_load(tmp_path, monkeypatch, capsys):
    """DSGRAPH_PROGRESS=1 shows the shard indexing and bytes-read bars on stderr (the rules: test_progress.py);
    progress=False keeps them off even then."""
    write_preset(tmp_path, "deepseek-llm-tiny", shards=3)
    monkeypatch.setenv("DSGRAPH_PROGRESS", "1")
    dsgraph.compile(models.load_checkpoint(tmp_path, progress=False), backend="eager")(IDS)
    assert tmp_path.name not in capsys.readouterr().err
    dsgraph.compile(models.load_checkpoint(tmp_path), backend="eager")(IDS)
    err = capsys.readouterr().err
    assert f"indexing {tmp_path.name}" in err and f"loading {tmp_path.name}" in err


def test_bf16_load_agrees_with_fp32(tmp_path):
    write_preset(tmp_path)
    ref = dsgraph.compile(models.load_checkpoint(tmp_path, mtp=False), backend="eager")(IDS)
    m = dsgraph.load(str(tmp_path), dtype="bfloat16", mtp=False)
    assert m.graph.params()["model.embed_tokens.weight"].type.dtype == "bfloat16"
    assert _rel(dsgraph.compile(m, backend="eager")(IDS), ref) < 5e-2


def test_tied_embeddings_accept_a_redundant_lm_head(tmp_path):
    def tie(c):
        c["tie_word_embeddings"] = True
    write_preset(tmp_path, "deepseek-llm-tiny", config_edit=tie,
                 edit=lambda t: t.update({"lm_head.weight": torch.randn(256, 64)}))
    m = models.load_checkpoint(tmp_path)
    assert "lm_head.weight" not in m.graph.params()


# config spellings ---------------------------------------------------------------------------------------------------
def test_rope_scaling_and_rope_parameters_spellings_agree():
    legacy = models.preset_config("deepseek-v2-tiny")
    rs = legacy["rope_scaling"]
    new = {k: v for k, v in legacy.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = {**{k: v for k, v in rs.items() if k != "type"}, "rope_type": "yarn", "rope_theta": 1e4}
    assert models.rope_attrs(models.from_hf(legacy)) == models.rope_attrs(models.from_hf(new))
    assert models.rope_attrs(models.from_hf(new))["mscale_all_dim"] == 0.707


def test_transformers_v3_config_defaults_to_sigmoid_noaux_tc():
    """transformers writes no scoring_func/topk_method for deepseek_v3 (it hard-codes them)."""
    cfg = models.preset_config("deepseek-v3-tiny")
    for k in ("scoring_func", "topk_method"):
        cfg.pop(k)
    c = models.from_hf(cfg)
    assert (c.scoring_func, c.topk_method) == ("sigmoid", "noaux_tc")


def test_public_entry_points(tmp_path):
    write_preset(tmp_path, "deepseek-llm-tiny")
    assert models.load_checkpoint.__module__ == "dsgraph.models.hf_loader"
    m = dsgraph.load(str(tmp_path))
    assert isinstance(m, models.Model) and m.config.model_type == "llama"
