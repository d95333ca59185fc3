"""The FP8 latent KV cache (pass fp8_latent_cache): FlashMLA's 656-byte row for V3 / V3.2, decode with the FP8 cache
within 5e-2 of the unquantised cache over a prompt and decode steps reaching T = 4 x index_topk, proven by the
harness on every MLA preset. One layer, so that no expert choice or indexer top-k downstream of the cache can flip
(an O(1) change that is the model's, not the cache's, error)."""
from __future__ import annotations

import dsgraph.models as models
import dsgraph.passes as passes
import pytest
import torch
from dsgraph.backends import get_backend

import dsgraph
from dsgraph.dtypes import itemsize
from dsgraph.errors import PassError
from dsgraph.numerics import rel_err

FP8 = ["absorb_mla", "fp8_latent_cache"]
MLA = [p for p in models.TINY_PRESETS if models.build_model(p, weights=False).config.is_mla]
TOL = passes.info("fp8_latent_cache").factory.tolerance
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # triton on the GPU where there is one, else interpreted


def one_layer(preset):
    return models.build_model(preset, mtp=False, overrides={"num_hidden_layers": 1})


@pytest.mark.parametrize("preset", MLA)
def test_proven_on_every_mla_preset(preset):
    res = passes.check(FP8, *(lambda m: (m.graph, m.weights))(one_layer(preset)), seq=4)
    assert res.ok and res.changed and res.rtol == TOL, res.report()


@pytest.mark.parametrize("preset", ["deepseek-v3-tiny", "deepseek-v3.2-tiny"])
def test_decode_with_fp8_cache_within_tolerance(preset):
    """Prompt of 9, then 3 one-token steps: T reaches 12 = 4 x the tiny V3.2's index_topk."""
    m = one_layer(preset)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = dsgraph.compile(m, backend="eager", passes=["absorb_mla"])
    fp8 = dsgraph.compile(m, backend="eager", passes=FP8)
    (a, s0), (b, s1) = ref.prefill(ids[:, :9]), fp8.prefill(ids[:, :9])
    errs = [rel_err(b, a)]
    for i in range(9, 12):
        (a, s0), (b, s1) = ref.decode(ids[:, i:i + 1], s0), fp8.decode(ids[:, i:i + 1], s1)
        errs.append(rel_err(b, a))
    assert 0 < max(errs) < TOL, errs
    cached = s1.caches["cache.0.latent_fp8"]
    assert cached.dtype == torch.float8_e4m3fn and cached.shape[1] == 12


def test_full_size_rows_are_656_bytes():
    m = models.build_model("deepseek-v3.2", weights=False, mtp=False, dtype="bfloat16",
                           overrides={"num_hidden_layers": 1})
    g, _, _ = passes.run_pipeline(m.graph, m.weights, FP8)
    row = {n: v.type.shape[2] * itemsize(v.type.dtype) for n, v in g.caches().items()}
    assert row == {"cache.0.latent_fp8": 512, "cache.0.latent_scale": 16, "cache.0.latent_rope": 128,
                   "cache.0.index_k": 256}
    assert sum(b for n, b in row.items() if "latent" in n) == 656


def test_needs_absorb_mla_first():
    m = one_layer("deepseek-v3-tiny")
    with pytest.raises(PassError, match="needs absorb_mla first"):
        passes.run_pipeline(m.graph, m.weights, ["fp8_latent_cache"])


def test_compile_option_kv_cache_dtype():
    m = one_layer("deepseek-v3.2-tiny")
    exe = dsgraph.compile(m, backend="triton", device=DEV, kv_cache_dtype="fp8")
    names = [r.name for r in exe.pass_records]
    assert names[names.index("absorb_mla") + 1] == "fp8_latent_cache" and "cache.0.latent_fp8" in exe.graph.inputs
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2)).to(DEV)
    assert rel_err(exe(ids), dsgraph.compile(m, backend="eager", device=DEV, passes=FP8)(ids)) < 1e-5
    with pytest.raises(dsgraph.ConfigError, match="kv_cache_dtype='int4'"):
        dsgraph.compile(m, backend="eager", kv_cache_dtype="int4")


# ---------------------------------------------------------------- the indexer key cache (pass fp8_index_cache)
def test_fp8_index_cache_is_the_references_fp8_indexer():
    """The rotated e4m3 key cache + indexer.logits_fp8 equal indexer.logits(fp8=True) (keys quantised per row,
    once when cached instead of every step) to T = 4 x index_topk; 132 bytes a key at full size; proven."""
    m = one_layer("deepseek-v3.2-tiny")
    res = passes.check(["fp8_index_cache"], m.graph, m.weights, seq=4)
    assert res.ok and res.changed and res.rtol == passes.info("fp8_index_cache").factory.tolerance, res.report()
    fp8 = dsgraph.compile(m, backend="eager", passes=["fp8_index_cache"])
    assert "indexer.logits" not in {n.op for n in fp8.graph.nodes}
    for node in m.graph.find("indexer.logits"):
        node.attrs["fp8"] = True
    ref = dsgraph.compile(m, backend="eager", passes=[])
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    (a, s0), (b, s1) = ref.prefill(ids[:, :9]), fp8.prefill(ids[:, :9])
    errs = [rel_err(b, a)]
    for i in range(9, 12):
        (a, s0), (b, s1) = ref.decode(ids[:, i:i + 1], s0), fp8.decode(ids[:, i:i + 1], s1)
        errs.append(rel_err(b, a))
    assert max(errs) < 1e-5, errs
    assert s1.caches["cache.0.index_k_fp8"].dtype == torch.float8_e4m3fn
    full = models.build_model("deepseek-v3.2", weights=False, mtp=False, dtype="bfloat16",
                              overrides={"num_hidden_layers": 1})
    g, _, _ = passes.run_pipeline(full.graph, full.weights, ["fp8_index_cache"])
    row = {n: v.type.shape[2] * itemsize(v.type.dtype) for n, v in g.caches().items() if "index" in n}
    assert row == {"cache.0.index_k_fp8": 128, "cache.0.index_k_scale": 4}


def test_fp8_index_cache_on_triton():
    """The triton FP8 indexer kernel reads the FP8 key cache (no fallback for the scores) and equals eager."""
    m = one_layer("deepseek-v3.2-tiny")
    pipeline = [*get_backend("triton").default_pipeline(), "fp8_index_cache"]
    exe = dsgraph.compile(m, backend="triton", device=DEV, passes=pipeline)
    kernels = {k.op: k.kernel for k in exe.compiled.report.kernels}
    assert kernels["indexer.logits_fp8"].endswith("FP8 key cache)")
    assert [k.op for k in exe.compiled.report.fallbacks] == ["indexer.quant_fp8"]
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(4)).to(DEV)
    assert rel_err(exe(ids), dsgraph.compile(m, backend="eager", device=DEV, passes=pipeline)(ids)) < 1e-5
