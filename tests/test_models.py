"""Model zoo: presets build (full size without weights), summaries match the published sizes,
every tiny preset runs and its cached decode equals full recompute."""
import time

import dsgraph.models as models
import pytest
import torch

import dsgraph
from dsgraph.errors import ConfigError


@pytest.mark.parametrize("name,total,activated", [
    ("deepseek-v3", 671e9, 37e9), ("deepseek-v2", 236e9, 21e9), ("deepseek-v2-lite", 15.7e9, 2.4e9),
    ("deepseek-moe-16b", 16.4e9, 2.65e9),  # 2.8B in the paper, which counts the embedding table
    ("deepseek-llm-7b", 6.9e9, 6.5e9), ("r1-distill-llama-8b", 8.0e9, 7.5e9),
])
def test_full_size_summary(name, total, activated):
    s = models.build_model(name, weights=False).summary()
    assert s.params == pytest.approx(total, rel=0.03)
    assert s.activated == pytest.approx(activated, rel=0.06)


def test_v3_builds_and_prints_in_seconds_without_weights():
    t0 = time.perf_counter()
    m = models.build_model("deepseek-v3", weights=False)
    text = str(m.graph)
    assert time.perf_counter() - t0 < 30
    assert len(m.weights) == 0
    assert "moe.experts" in text and "mtp.branch" in text
    s = m.summary()
    assert s.kv_naive // 61 == 128 * (192 + 128) and s.kv_absorbed // 61 == 576


@pytest.mark.parametrize("name", models.TINY_PRESETS)
def test_tiny_preset_decode_matches_full_recompute(name):
    model = models.build_model(name, seed=1, mtp=False)
    exe = dsgraph.compile(model, backend="eager")
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    nxt = torch.randint(0, model.config.vocab_size, (2, 2), generator=torch.Generator().manual_seed(1))
    full = exe(torch.cat([prompt, nxt], 1))
    logits, state = exe.prefill(prompt)
    step, state = exe.decode(nxt, state)
    rel = (step - full[:, 5:]).norm() / full[:, 5:].norm()
    assert rel < 1e-5
    assert state.length == 7
    assert torch.isfinite(full).all() and full.std() > 0.1


def test_random_weights_are_deterministic_and_lazy():
    a = models.build_model("deepseek-v2-tiny", seed=3)
    b = models.build_model("deepseek-v2-tiny", seed=3)
    c = models.build_model("deepseek-v2-tiny", seed=4)
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    assert a.weights.is_lazy(name)
    assert torch.equal(a.weights[name], b.weights[name])
    assert not torch.equal(a.weights[name], c.weights[name])


def test_fp8_preset_dequantises_close_to_float():
    m = models.build_model("deepseek-v3-fp8-tiny", mtp=False)
    w = m.weights["model.layers.0.self_attn.q_a_proj.weight"]
    s = m.weights["model.layers.0.self_attn.q_a_proj.weight_scale_inv"]
    assert w.dtype == torch.float8_e4m3fn and s.shape == (2, 4)      # 24 x 64 in 16 x 16 blocks: a partial edge
    ref = models.random_weights(m.graph, 0)  # same seed: same fp32 draw before quantisation
    from dsgraph.models.random_weights import random_tensor

    from dsgraph.ops.mlp import dequant_fp8_block
    exact = random_tensor("model.layers.0.self_attn.q_a_proj.weight", (24, 64), "float32", 0)
    deq = dequant_fp8_block(w, s, (16, 16))
    assert (deq - exact).norm() / exact.norm() < 0.05
    assert ref is not None


def test_large_fp8_weights_dequantise_in_bands(monkeypatch):
    """A weight above BAND_ELEMENTS is dequantised band by band straight into the output dtype (the triton backend
    folds cast(dequant_fp8) that way): the same numbers as the one-shot form, partial edge blocks included."""
    from dsgraph.models import quantize_fp8_block

    from dsgraph.ops import mlp
    w, s = quantize_fp8_block(torch.randn(300, 200, generator=torch.Generator().manual_seed(0)), (128, 128))
    whole = mlp.dequant_fp8_block(w, s, (128, 128))
    monkeypatch.setattr(mlp, "BAND_ELEMENTS", 128 * 200)
    assert torch.equal(mlp.dequant_fp8_block(w, s, (128, 128)), whole)
    assert torch.equal(mlp.dequant_fp8_block(w, s, (128, 128), out_dtype=torch.bfloat16), whole.bfloat16())


def test_grouped_attention_reference_equals_repeated_heads():
    """attention_ref groups query heads over their shared K/V head; the textbook form repeats K/V per head."""
    from dsgraph.ops.attention import attention_ref
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=gen), torch.randn(2, 5, 2, 8, generator=gen),
               torch.randn(2, 5, 2, 4, generator=gen))
    kr, vr = k.repeat_interleave(3, dim=2), v.repeat_interleave(3, dim=2)
    s = torch.einsum("bshd,bthd->bhst", q, kr) * 0.3
    s = s.masked_fill(~(torch.arange(5)[None, :] <= torch.arange(3)[:, None] + 2), float("-inf"))
    want = torch.einsum("bhst,bthd->bshd", torch.softmax(s, -1), vr)
    assert torch.allclose(attention_ref(q, k, v, 0.3, True), want, rtol=1e-5, atol=1e-6)


def test_bf16_compile_runs_and_agrees_loosely():
    model = models.build_model("deepseek-v3-tiny", mtp=False)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    ref = dsgraph.compile(model, dtype="float32")(ids)
    out = dsgraph.compile(model, dtype="bf16")(ids)
    assert out.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < 5e-2


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="deepseek-v3-tiny"):
        models.build_model("deepseek-v9")


def test_config_errors_name_the_key():
    cfg = models.preset_config("deepseek-v2-lite-tiny")
    del cfg["kv_lora_rank"]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        models.from_hf(cfg)
    with pytest.raises(ConfigError, match="model_type"):
        models.from_hf({**cfg, "model_type": "gpt2"})


def test_preset_overrides_replace_config_keys_and_bad_ones_name_the_preset():
    model = models.build_model("deepseek-v3-tiny", mtp=False, overrides={"num_hidden_layers": 2,
                                                                         "num_attention_heads": 8})
    assert (model.config.num_hidden_layers, model.config.num_attention_heads) == (2, 8)
    assert sum(name.endswith("q_b_proj.weight") for name in model.graph.params()) == 2
    with pytest.raises(ConfigError, match="preset deepseek-v3-tiny with"):
        models.build_model("deepseek-v3-tiny", overrides={"model_type": "gpt2"})
