"""DeepSeek-V3.1 / V3.2 as models: presets at full size without weights (parameters, activated parameters, KV cache
with the indexer's keys), config keys and their errors, ue8m0 scales checked on load, and the tiny preset's
sparsity really changing its output."""
from __future__ import annotations

import json

import dsgraph.models as models
import hf_fixtures as fx
import pytest
import torch
from dsgraph.models.config import from_hf

import dsgraph
from dsgraph.analysis import numel
from dsgraph.errors import CheckpointError, ConfigError


def test_full_size_presets_are_summarised_without_weights():
    v32 = models.build_model("deepseek-v3.2", weights=False, mtp=False)
    s = v32.summary()
    c = v32.config
    assert (c.index_n_heads, c.index_head_dim, c.index_topk, c.fp8_scale_fmt) == (64, 128, 2048, "ue8m0")
    per_layer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64        # wq_b, wk, k_norm, weights_proj
    per_layer += 64 * 12 + 1 * 56                                          # wq_b's and wk's 128x128 FP8 scales
    indexer = sum(numel(v.type) for n, v in v32.graph.params().items() if ".indexer." in n)
    assert indexer == 61 * per_layer and s.params - indexer == 671_067_257_432     # V3's count (dsgraph show)
    assert s.kv_indexer == 61 * 128 and s.kv_absorbed == 61 * 576
    assert "indexer keys    7,808 values" in str(s) and "absorbed MLA + indexer 42,944 values" in str(s)
    v31 = from_hf(models.preset_config("deepseek-v3.1"))
    assert v31.fp8_scale_fmt == "ue8m0" and v31.model_type == "deepseek_v3" and not v31.is_dsa


def test_dsa_config_errors():
    cfg = models.preset_config("deepseek-v3.2-tiny")
    with pytest.raises(ConfigError, match="missing DeepSeek Sparse Attention key 'index_topk'"):
        from_hf({**cfg, "index_topk": None})
    with pytest.raises(ConfigError, match="missing DeepSeek Sparse Attention key 'q_lora_rank'"):
        from_hf({**cfg, "q_lora_rank": None})
    qc = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16], "scale_fmt": "e5m2"}
    with pytest.raises(ConfigError, match="scale_fmt 'e5m2' is not supported"):
        from_hf({**cfg, "quantization_config": qc})


def test_tiny_preset_is_sparse():
    """index_topk 3 below a 6-token prompt: widening it (dense attention over the same weights) changes the logits;
    the graph carries one indexer key cache per layer beside the MLA caches."""
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    sparse = models.build_model("deepseek-v3.2-tiny", mtp=False)
    dense = models.build_model("deepseek-v3.2-tiny", mtp=False, overrides={"index_topk": 64})
    a = dsgraph.compile(sparse, backend="eager")(ids)
    b = dsgraph.compile(dense, backend="eager")(ids)
    assert float((a - b).norm() / b.norm()) > 1e-2
    assert [n for n in sparse.graph.caches() if "index_k" in n] == [f"cache.{i}.index_k" for i in range(3)]


def test_ue8m0_scales_that_are_not_powers_of_two_are_refused(tmp_path):
    """A checkpoint declaring scale_fmt ue8m0 whose float32 scales are not powers of two is refused on read."""
    hf = fx.hf_model(fx.tiny_config("v3"), seed=4)
    hf.save_pretrained(tmp_path)
    fx.quantize_checkpoint_fp8(tmp_path, (16, 16))                                # float scales (V3's)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = dsgraph.load(str(tmp_path), mtp=False)
    with pytest.raises(CheckpointError, match="not powers of two.*scale_fmt 'ue8m0'"):
        model.weights["model.layers.0.self_attn.q_a_proj.weight"]


def test_mtp_speculation_keeps_greedy_tokens():
    """V3.2's MTP module has its own indexer and key cache: drafting, verifying k+1 tokens and rolling the caches
    back (the indexer's included) leaves plain greedy decoding's tokens."""
    exe = dsgraph.compile(dsgraph.load("deepseek-v3.2-tiny"), backend="eager", keep_mtp=True)
    assert "cache.mtp.index_k" in exe.mtp[0].inputs
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    plain = exe.generate(ids, max_new_tokens=8)
    assert torch.equal(exe.generate(ids, max_new_tokens=8, speculative="mtp", draft_depth=2), plain)
