"""DeepSeek-V4 presets: full size built without allocating a weight, with `dsgraph show`'s parameter counts at the
published sizes and the KV cache per layer type; the tiny preset has every layer and MoE kind; config spellings."""
from __future__ import annotations

import pytest
import torch
from dsgraph.models import build_model, preset_config
from dsgraph.models.v4_config import CSA, HCA, SLIDING, from_hf_v4

import dsgraph
from dsgraph.errors import ConfigError


def test_flash_full_size_is_built_lazily_with_published_sizes():
    m = build_model("deepseek-v4-flash", weights=False)
    s = m.summary()
    assert len(m.weights) == 0
    assert 283e9 < s.params < 285e9 and 12.5e9 < s.activated < 13.5e9     # "284B total / 13B active"
    assert 6e9 < s.mtp_params < 7e9 and "in the MTP block" in str(s)        # counted apart, as for V3
    c = m.config
    assert s.kinds[CSA][1] == c.head_dim / 4 + c.index_head_dim / 4 and s.kinds[HCA][1] == c.head_dim / 128
    assert s.graph_values_per_token == sum(n * per_token for n, per_token, _ in s.kinds.values())   # compact
    assert "compressed_sparse_attention" in str(s) and "KiB/token" in str(s)
    assert {n.op for n in m.graph.nodes} >= {"dequant_fp8", "dequant_mxfp4", "v4.compress", "attention.sink"}


def test_compressed_caches_are_compact():
    """One entry per complete group: after 10 + 3 tokens the CSA caches (groups of 4) hold 3 entries, the HCA one
    (groups of 8) 1; the window and compressor states keep their fixed rows; cache.tokens holds the count only."""
    m = build_model("deepseek-v4-tiny", seed=1)
    types = {n: tuple(map(str, v.type.shape)) for n, v in m.graph.caches().items()}
    assert types["cache.1.cmp"] == ("B", "T//4", "32") and types["cache.1.index"] == ("B", "T//4", "16")
    assert types["cache.2.cmp"] == ("B", "T//8", "32") and types["cache.tokens"] == ("B", "T", "0")
    exe = dsgraph.compile(m, backend="eager")
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(3))
    _, state = exe.prefill(ids[:, :10])
    for t in range(10, 13):
        _, state = exe.decode(ids[:, t:t + 1], state)
    rows = {n: tuple(t.shape[1:]) for n, t in state.caches.items()}
    assert rows["cache.1.cmp"] == rows["cache.3.cmp"] == (3, 32) and rows["cache.1.index"] == (3, 16)
    assert rows["cache.2.cmp"] == (1, 32) and rows["cache.2.cmp_state"] == (7, 64) and rows["cache.1.win"] == (7, 32)
    assert rows["cache.tokens"] == (13, 0) and state.caches["cache.tokens"].numel() == 0


def test_tiny_has_every_layer_and_moe_kind():
    c = build_model("deepseek-v4-tiny", weights=False).config
    assert set(c.layer_types) == {SLIDING, CSA, HCA} and set(c.mlp_layer_types) == {"hash_moe", "moe"}
    assert c.num_hidden_layers <= 4 and c.hidden_size <= 64


def test_legacy_config_spelling_and_errors():
    cfg = {**preset_config("deepseek-v4-tiny"), "compress_ratios": [0, 4, 128, 4], "num_hash_layers": 1}
    cfg.pop("layer_types")
    c = from_hf_v4(cfg)
    assert c.layer_types == [SLIDING, CSA, HCA, CSA] and c.mlp_layer_types == ["hash_moe", "moe", "moe", "moe"]
    assert c.mtp_layer_type == SLIDING                                  # no entry for the MTP block: as released
    assert from_hf_v4({**cfg, "compress_ratios": [0, 4, 128, 4, 128]}).mtp_layer_type == HCA
    with pytest.raises(ConfigError, match="compress_ratios"):
        from_hf_v4({**cfg, "compress_ratios": [0, 4, 64, 4]})
    with pytest.raises(ConfigError, match="o_groups"):
        from_hf_v4({k: v for k, v in cfg.items() if k != "o_groups"})


def test_artifact_round_trip_keeps_the_v4_config(tmp_path):
    m = build_model("deepseek-v4-tiny")
    exe = dsgraph.compile(m, backend="eager")
    exe.save(tmp_path / "a")
    back = dsgraph.load_artifact(tmp_path / "a")
    ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(2))
    assert torch.equal(back.generate(ids, max_new_tokens=3), exe.generate(ids, max_new_tokens=3))
