"""The DSA Triton kernels (backends/triton/kernels/dsa.py) against their ops' torch references, on the interpreter:
odd head counts and widths, T below and above the top-k (and T = 4 x top-k), ragged valid counts per request
(-1 slots), fp32 and fp16; and the tiny V3.2 preset's report naming them."""
from __future__ import annotations

import os
import subprocess
import sys

import dsgraph.models as models
import pytest
import torch
from dsa_loops import causal_topk_indices
from dsgraph.backends import get_backend
from dsgraph.backends.triton.kernels.dsa import indexer_logits, sparse_mla
from dsgraph.backends.triton.kernels.topk import topk

import dsgraph
from dsgraph.errors import InputError
from dsgraph.numerics import rel_err, tolerance
from dsgraph.ops import get_op

G = torch.Generator().manual_seed(7)
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels on the GPU where there is one, else interpreted


def R(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=G).to(DEV, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("s,t,h,d", [(1, 9, 5, 24), (4, 4, 3, 16), (3, 70, 8, 32)])
def test_indexer_logits(s, t, h, d, dtype):
    q, k, w = R(2, s, h, d, dtype=dtype), R(2, t, d, dtype=dtype), R(2, s, h)
    got = indexer_logits(q, k, w, 0.2)
    want = get_op("indexer.logits").reference_fn(q, k, w, scale=0.2, causal=True)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    assert rel_err(got[fin], want[fin]) < tolerance(str(dtype).removeprefix("torch."), "op")


@pytest.mark.parametrize("s,t,k", [(3, 9, 4), (1, 5, 8), (2, 32, 8), (1, 1500, 37)])
def test_topk_kernel_selects_as_the_reference(s, t, k):
    """The reference's picks in its order: T below / above k, T = 4 x k, a row over two blocks (1500), runs of
    tied logits (ties to the lower position), near-equal logits, -0.0 beside +0.0, a row with fewer finite logits
    than k, none."""
    x = R(2, s, t)
    x[0, 0, : t // 2] = 0.5
    x[0, -1, 3:] = 1 + x[0, -1, 3:] * 1e-6     # keys sharing their high digits: every radix pass decides
    x[0, -1, :3] = torch.tensor([0.0, -0.0, 0.0])[: min(3, t)]
    x[1, -1, t // 3:] = float("-inf")
    x[1, 0] = float("-inf")
    got = topk(x, k)
    assert torch.equal(got, get_op("indexer.topk").reference_fn(x, k=k))
    assert (got[1, 0] == -1).all()


def _ragged(b, s, t, k):
    """Causal picks per query, then fewer valid slots for the second request (its tail set to -1)."""
    idx = causal_topk_indices(b, s, t, k, G)
    idx[1, :, k // 2:] = -1
    return idx.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("s,t,h,k", [(1, 7, 3, 16), (5, 5, 4, 3), (2, 33, 6, 8), (1, 32, 2, 8)])
def test_sparse_mla(s, t, h, k, dtype):
    """(1, 32, 2, 8): T = 4 x top-k, decode."""
    c, r = 20, 6
    q, cache, idx = R(2, s, h, c + r, dtype=dtype), R(2, t, c + r, dtype=dtype), _ragged(2, s, t, k)
    got = sparse_mla(q, cache, idx, 0.3, c)
    want = get_op("attention.mla_sparse_absorbed").reference_fn(q, cache, idx, scale=0.3, causal=True, kv_lora_rank=c)
    assert rel_err(got, want) < tolerance(str(dtype).removeprefix("torch."), "op")
    assert torch.equal(sparse_mla(q, cache, idx.int(), 0.3, c), got)     # int32 indices read alike
    parts = sparse_mla(q[..., :c].contiguous(), cache, idx, 0.3, c, q_rope=q[..., c:].contiguous())
    assert torch.equal(parts, got)                                        # the query in two parts (concat region)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_mla_over_the_fp8_cache(dtype):
    """The FP8 latent cache's three parts (e4m3 rows, group scales, RoPE rows) read by the kernel itself equal the
    reference over their dequantised concat; T = 4 x top-k, ragged valid counts, K over two 32-slot tiles."""
    c, r, group, s, t, h, k = 32, 8, 16, 2, 160, 3, 40
    q, latent, idx = R(2, s, h, c + r, dtype=dtype), R(2, t, c + r), _ragged(2, s, t, k)
    rows, scales = get_op("kv.quant_fp8").reference_fn(latent[..., :c], group=group)
    rope = latent[..., c:].to(dtype)
    got = sparse_mla(q, rows, idx, 0.3, c, cache_scale=scales, cache_rope=rope)
    dequant = get_op("kv.dequant_fp8").reference_fn(rows, scales, group=group, dtype="float32").to(dtype)
    want = get_op("attention.mla_sparse_absorbed").reference_fn(q, torch.cat((dequant, rope), -1), idx, scale=0.3,
                                                                causal=True, kv_lora_rank=c)
    assert rel_err(got, want) < tolerance(str(dtype).removeprefix("torch."), "op")
    with pytest.raises(InputError, match="float8_e4m3fn rows"):
        sparse_mla(q, rows, idx, 0.3, c, cache_rope=rope)


def test_tiny_v32_report_names_the_dsa_kernels():
    report = dsgraph.compile(dsgraph.load("deepseek-v3.2-tiny"), backend="triton", device=DEV).compiled.report
    kernels = {k.op: k.kernel for k in report.kernels}
    assert kernels["indexer.logits"] == "dsa._indexer_logits_kernel"
    assert kernels["attention.mla_sparse_absorbed"].startswith("dsa._sparse_mla_kernel")
    assert kernels["mla.query_absorbed"].startswith("mla_query._mla_query_kernel")   # q made whole in one launch
    assert kernels["norm.layer"].startswith("layer_norm_n16")
    assert kernels["indexer.topk"].startswith("topk._topk_kernel") and not report.fallbacks


def test_device_lengths_of_a_static_capacity_step():
    """kv_lens (CUDA-graph decode: caches at a fixed capacity, rows past a request's length are stale): the scores
    past the length are -inf and the attention equals the reference on the cache cut to that length."""
    lens, cap, s, h, d, c, r = torch.tensor([5, 9], device=DEV), 12, 1, 3, 16, 20, 6
    q, k, w = R(2, s, h, d), R(2, cap, d), R(2, s, h)
    got = indexer_logits(q, k, w, 0.2, kv_lens=lens)
    lq, cache = R(2, s, h, c + r), R(2, cap, c + r)
    for b, n in enumerate(lens.tolist()):
        want = get_op("indexer.logits").reference_fn(q[b:b + 1], k[b:b + 1, :n], w[b:b + 1], scale=0.2, causal=True)
        assert rel_err(got[b:b + 1, :, :n], want) < 1e-5 and torch.isneginf(got[b, :, n:]).all()
    idx = torch.stack([causal_topk_indices(1, s, n, 4, G)[0] for n in lens.tolist()]).to(DEV)
    out = sparse_mla(lq, cache, idx, 0.3, c, kv_lens=lens)
    for b, n in enumerate(lens.tolist()):
        want = get_op("attention.mla_sparse_absorbed").reference_fn(lq[b:b + 1], cache[b:b + 1, :n], idx[b:b + 1],
                                                                     scale=0.3, causal=True, kv_lora_rank=c)
        assert rel_err(out[b:b + 1], want) < 1e-5


@pytest.mark.parametrize("preset", ["deepseek-v3.2-tiny", "deepseek-v3-tiny"])
def test_fp8_cache_reads(preset):
    """The FP8 latent cache's reads: V3.2's sparse MLA kernel dequantises the rows it gathers (one step with the
    query and cache parts, no kv.dequant_fp8 launch); dense MLA reads them through the generated row kernel.
    kv.quant_fp8 is a generated kernel on CUDA, a reported fallback on the interpreter. The compiled model equals
    its reference graph node for node."""
    m = models.build_model(preset, mtp=False, overrides={"num_hidden_layers": 1})
    exe = dsgraph.compile(m, backend="triton", device=DEV, kv_cache_dtype="fp8")
    report = exe.compiled.report
    kernels = {k.op: k.kernel for k in report.kernels}
    if preset == "deepseek-v3.2-tiny":
        assert kernels["kv.dequant_fp8+concat+attention.mla_sparse_absorbed"] == (
            "dsa._sparse_mla_kernel (FP8 latent rows dequantised in registers)")   # q: one mla.query_absorbed
        assert "kv.dequant_fp8" not in kernels
    else:
        assert kernels["kv.dequant_fp8"] == "fp8_dequant_n32_g32_float32"
    assert [k.op for k in report.fallbacks] == (["kv.quant_fp8"] if DEV == "cpu" else [])
    assert not exe.localize(torch.randint(0, 256, (2, 5), generator=G))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the interpreter rounds to e4m3 wrongly)")
@pytest.mark.parametrize("n,group", [(512, 128), (32, 32)])
def test_fp8_cache_writes_gpu(n, group):
    """kv.quant_fp8's generated kernel: the reference's e4m3 rows and scales bit for bit (FlashMLA's 512 / 128)."""
    b = dsgraph.GraphBuilder("quant", dtype="bfloat16")
    q, s = b.kv.quant_fp8(b.input("x", ("B", "T", n), "bfloat16"), group=group)
    b.output("q", q)
    b.output("s", s)
    compiled = get_backend("triton").compile(b.build(), {}, device="cuda")
    assert [k.kernel for k in compiled.report.kernels] == [f"fp8_quant_n{n}_g{group}"]
    x = R(3, 37, n, dtype=torch.bfloat16) * 5
    got = compiled.run({"x": x})
    want_q, want_s = get_op("kv.quant_fp8").reference_fn(x, group=group)
    assert torch.equal(got["s"], want_s) and torch.equal(got["q"].view(torch.uint8), want_q.view(torch.uint8))


@pytest.mark.parametrize("s,t,h", [(1, 9, 5), (3, 70, 8)])
def test_fp8_indexer_logits(s, t, h):
    """The FP8 path: e4m3 q, k with fp32 per-token scales against the op's reference on the dequantised values."""
    d = 32
    q8, k8 = (R(2, s, h, d) * 40).to(torch.float8_e4m3fn), (R(2, t, d) * 40).to(torch.float8_e4m3fn)
    qs, ks, w = R(2, s, h).abs() / 64, R(2, t).abs() / 64, R(2, s, h)
    got = indexer_logits(q8, k8, w, 0.2, q_scale=qs, k_scale=ks)
    want = get_op("indexer.logits").reference_fn(q8.float() * qs[..., None], k8.float() * ks[..., None], w,
                                                 scale=0.2, causal=True)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    assert rel_err(got[fin], want[fin]) < 1e-5
    with pytest.raises(InputError, match="k_scale"):
        indexer_logits(q8, k8, w, 0.2, q_scale=qs)


def test_fp8_indexer_numerics_run_the_fp8_kernel():
    """indexer.logits(fp8=True), DeepSeek's Hadamard + e4m3 scores (D = 128, one scale per token as V3.2's): the
    FP8 kernel over the rotated, quantised q and k equals the op's reference; the report says where they are made."""
    b = dsgraph.GraphBuilder("fp8_indexer", dtype="float32")
    q, k, w = b.input("q", ("B", 2, 4, 128), "float32"), b.input("k", ("B", "T", 128), "float32"), \
        b.input("w", ("B", 2, 4), "float32")
    b.output("logits", b.indexer.logits(q, k, w, scale=0.1, fp8=True))
    compiled = get_backend("triton").compile(b.build(), {}, device=DEV)
    (step,) = compiled.report.kernels
    assert step.kernel.startswith("dsa._indexer_logits_kernel (FP8") and "rounded to e4m3" in step.note
    assert not compiled.report.fallbacks
    ins = {"q": R(2, 2, 4, 128), "k": R(2, 9, 128), "w": R(2, 2, 4)}
    want = get_op("indexer.logits").reference_fn(*ins.values(), scale=0.1, causal=True, fp8=True)
    got = compiled.run(ins)["logits"]
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)) and rel_err(got[fin], want[fin]) < 1e-5




def test_sparse_mla_fits_hopper_shared_memory(tmp_path):
    """The launches sparse_mla makes at V3.2's full size (128 heads, K = 2048, bf16), over the bf16 and the FP8
    latent cache, compiled for sm_90 on any machine (a subprocess: this one may run the interpreter), within an
    H200's 227 KB of shared memory (the FP8 one needed 321 KB at 64 slots a tile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from dsgraph.backends.triton.kernels.dsa import sparse_mla_shared_bytes as f; "
            "print(f(False), f(True))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)  # the installed dsgraph, not a source folder in the working directory
    assert out.returncode == 0, out.stderr[-3000:]
    assert all(0 < int(n) <= 232448 for n in out.stdout.split()), out.stdout
