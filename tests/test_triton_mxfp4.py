"""The MXFP4 weight-only GEMM kernel against dequant_mxfp4's reference + a fp32 matmul: odd M and N, K a multiple
of 32 but not of the 64-wide K block, every nibble and scales around 2**0, in fp32 and fp16. The fused MoE on MXFP4
experts (both grouped GEMMs, our decode and tl.dot_scaled's) against dequantise-then-per-expert-matmul, with an idle
expert, token counts that are not a tile multiple, the single-token layout and V4's clamped SwiGLU; bf16 on CUDA."""
from __future__ import annotations

import pytest
import torch

from dsgraph.errors import ShapeError
from dsgraph.numerics import rel_err, tolerance
from dsgraph.ops import get_op
from dsgraph.ops.moe import moe_experts_ref
from dsgraph.ops.v4_mix import dequant_mxfp4_ref, swiglu_clamped_ref

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from dsgraph.backends.triton.kernels.common import dot_precision  # noqa: E402
from dsgraph.backends.triton.kernels.moe_mxfp4 import MXFP4Config, _mxfp4_dot, fused_moe_mxfp4, mxfp4_configs  # noqa: E402
from dsgraph.backends.triton.kernels.mxfp4 import mxfp4_matmul  # noqa: E402

G = torch.Generator().manual_seed(4)
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels on the GPU where there is one, else interpreted


@pytest.mark.parametrize("m,n,k", [(1, 40, 64), (5, 33, 96), (17, 64, 128), (3, 7, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mxfp4_gemm_matches_reference(m, n, k, dtype):
    w = torch.randint(-128, 128, (n, k // 2), generator=G, dtype=torch.int8)
    s = torch.randint(124, 130, (n, k // 32), generator=G, dtype=torch.uint8)
    x = torch.randn(m, k, generator=G)
    want = x @ get_op("dequant_mxfp4").reference_fn(w, s).T
    got = mxfp4_matmul(x.to(DEV, dtype), w.to(DEV), s.to(DEV)).cpu()
    assert got.dtype == dtype and got.shape == (m, n)
    assert rel_err(got.float(), want) < (1e-5 if dtype == torch.float32 else tolerance("float16"))


def test_every_nibble_decodes():
    codes = torch.arange(16, dtype=torch.uint8)
    w = (codes[0::2] | (codes[1::2] << 4)).view(torch.int8).repeat(1, 2)[None].reshape(1, 16)  # 32 values
    s = torch.full((1, 1), 127, dtype=torch.uint8)
    eye = torch.eye(32)
    got = mxfp4_matmul(eye.to(DEV), w.to(DEV), s.to(DEV))[:, 0].cpu()
    assert torch.equal(got, get_op("dequant_mxfp4").reference_fn(w, s)[0])


def test_shapes_are_checked():
    with pytest.raises(ShapeError, match="multiple of 32"):
        mxfp4_matmul(torch.randn(2, 48, device=DEV), torch.zeros(4, 24, dtype=torch.int8, device=DEV),
                     torch.zeros(4, 1, dtype=torch.uint8, device=DEV))


@triton.jit
def _decoded_tile(a_ptr, w_ptr, s_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                  NATIVE: tl.constexpr, A_FMT: tl.constexpr):
    """out = eye(K) @ dequant(W)^T through one `_mxfp4_dot`: the decoded weight tile itself, transposed."""
    rows = tl.arange(0, K)
    offs_n = tl.arange(0, BLOCK_N)
    acc = _mxfp4_dot(tl.zeros((K, BLOCK_N), dtype=tl.float32), a_ptr, rows, rows < K, 0, K, w_ptr, s_ptr, offs_n,
                     offs_n < N, K // 2, K // 32, PRECISION, NATIVE, A_FMT, K)
    tl.store(out_ptr + rows[:, None] * BLOCK_N + offs_n[None, :], acc)


@pytest.mark.parametrize("dtype,native", [(torch.float16, False), (torch.float16, True)]
                         + ([(torch.bfloat16, False), (torch.bfloat16, True)] if DEV == "cuda" else []))
def test_mxfp4_dot_decodes_every_byte(dtype, native):
    """Both decodes of the fused MoE's inner dot, alone: every byte value at scales 2**-7..2**7, exact."""
    n, k = 32, 64
    w = torch.arange(n * k // 2, dtype=torch.int32).remainder(256).to(torch.uint8).view(torch.int8).reshape(n, k // 2)
    s = (120 + torch.arange(n * k // 32) % 15).to(torch.uint8).reshape(n, k // 32)
    out = torch.empty(k, n, dtype=torch.float32, device=DEV)
    _decoded_tile[(1,)](torch.eye(k, dtype=dtype, device=DEV), w.to(DEV), s.to(DEV), out, n, K=k, BLOCK_N=n,
                        PRECISION=dot_precision(dtype), NATIVE=native, A_FMT="bf16" if dtype == torch.bfloat16
                        else "fp16")
    want = dequant_mxfp4_ref(w, s)
    assert torch.equal(out.T.cpu(), want), (out.T.cpu() - want).abs().max()


def _experts(e: int, h: int, i: int, device=DEV, g=G):
    """Random MXFP4 experts: gate_up [E, 2I, H/2] + scales, down [E, H, I/2] + scales, scales near 2**-2."""
    def packed(rows, cols):
        w = torch.randint(-128, 128, (e, rows, cols // 2), generator=g, dtype=torch.int8)
        return w.to(device), torch.randint(122, 128, (e, rows, cols // 32), generator=g, dtype=torch.uint8).to(device)
    return (*packed(2 * i, h), *packed(h, i))


def _moe_ref(x, w, ids, gu, gus, dn, dns, limit):
    """Dequantise every expert, then the naive per-expert MoE (fp32)."""
    e, i = gu.shape[0], gu.shape[1] // 2
    ws = []
    for j in range(e):
        g_u = dequant_mxfp4_ref(gu[j].cpu(), gus[j].cpu())
        ws += [g_u[:i], g_u[i:], dequant_mxfp4_ref(dn[j].cpu(), dns[j].cpu())]
    ffn = {} if limit is None else {"ffn": lambda t, a, b, c: swiglu_clamped_ref(t, a, b, c, limit=limit)}
    return moe_experts_ref(x.float().cpu(), w.cpu(), ids.cpu(), *ws, num_experts=e, **ffn)


@pytest.mark.parametrize("dtype,mode,n,limit", [(torch.float32, {}, 5, 0.5), (torch.float16, {}, 1, None),
                                                (torch.float16, {"native": True}, 5, 0.5),
                                                (torch.float16, {"gemv": 2}, 5, 0.5)])
def test_fused_moe_mxfp4_matches_dequantised_reference(dtype, mode, n, limit):
    e, k, h, i = 4, 2, 96, 32      # H = 96: a 64-wide K tile and a half one; expert 3 gets no token
    weights = _experts(e, h, i)
    x, w = torch.randn(n, h, generator=G), torch.rand(n, k, generator=G)
    ids = torch.stack([torch.randperm(e - 1, generator=G)[:k] for _ in range(n)])
    got = fused_moe_mxfp4(x.to(DEV, dtype), w.to(DEV), ids.to(DEV), *weights,
                          config=MXFP4Config(16, 16, 64, 1, 1, **mode), limit=limit).cpu()
    assert got.dtype == dtype and got.shape == (n, h)
    assert rel_err(got.float(), _moe_ref(x, w, ids, *weights, limit)) < (1e-5 if dtype == torch.float32
                                                                          else tolerance("float16"))


def test_fused_moe_mxfp4_checks_shapes():
    gu, gus, dn, dns = _experts(2, 64, 32)
    with pytest.raises(ShapeError, match="down_scale"):
        fused_moe_mxfp4(torch.randn(3, 64, device=DEV), torch.rand(3, 1, device=DEV),
                        torch.zeros(3, 1, dtype=torch.long, device=DEV), gu, gus, dn, dns[:, :, :0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("n", [1, 40])
def test_fused_moe_mxfp4_bf16_on_cuda(n, native):
    e, k, h, i = 16, 4, 512, 256
    g = torch.Generator().manual_seed(n)
    weights = _experts(e, h, i, "cuda", g)
    x, w = torch.randn(n, h, generator=g), torch.rand(n, k, generator=g)
    ids = torch.stack([torch.randperm(e - 2, generator=g)[:k] for _ in range(n)])
    want = _moe_ref(x, w, ids, *weights, 10.0)
    cfg = MXFP4Config(16, 64, 128, 4, 3, native=native)
    got = fused_moe_mxfp4(x.cuda().bfloat16(), w.cuda(), ids.cuda(), *weights, config=cfg, limit=10.0)
    assert rel_err(got.float().cpu(), want) < tolerance("bfloat16")
    tuned = fused_moe_mxfp4(x.cuda().bfloat16(), w.cuda(), ids.cuda(), *weights, limit=10.0)   # autotuned tiles
    assert rel_err(tuned.float().cpu(), want) < tolerance("bfloat16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [1, 40])
def test_every_mxfp4_candidate_is_correct_on_cuda(n):
    """The autotuner may pick any candidate, so each must be right (tl.dot_scaled's were not when pipelined)."""
    e, k, h, i = 16, 4, 512, 256
    g = torch.Generator().manual_seed(n)
    weights = _experts(e, h, i, "cuda", g)
    x, w = torch.randn(n, h, generator=g), torch.rand(n, k, generator=g)
    ids = torch.stack([torch.randperm(e - 2, generator=g)[:k] for _ in range(n)])
    want = _moe_ref(x, w, ids, *weights, 10.0)
    bad = {}
    for cfg in mxfp4_configs(n * k, e):
        got = fused_moe_mxfp4(x.cuda().bfloat16(), w.cuda(), ids.cuda(), *weights, config=cfg, limit=10.0)
        err = rel_err(got.float().cpu(), want)
        if not err < tolerance("bfloat16"):
            bad[str(cfg)] = round(err, 3)
    assert not bad, "\n".join(f"{c}: {e}" for c, e in bad.items())
