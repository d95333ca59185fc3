"""MXFP4 weight-only GEMM: y [M, N] = x [M, K] @ dequant(w)^T with w [N, K/2] two e2m1 values a byte (low nibble
first) and e8m0 scales s [N, K/32] (2**(s - 127) per 32 along K), as DeepSeek-V4 ships its routed experts.

Why: Hopper has no FP4 tensor cores, but a decode-shaped expert GEMM is bound by the weight bytes it reads; reading
the packed nibbles (half a byte a weight, a byte per 32 for the scale) instead of bf16 rows reads ~1/4 of the
bytes. The nibbles are decoded in registers (sign, 2-bit exponent, 1-bit mantissa: no lookup table), scaled, and
multiplied on the tensor cores in the activation dtype (fp32 accumulation). The even and odd columns of x meet the
low and high nibbles of each byte, so no register interleave is needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsgraph.errors import ShapeError

from .common import check_float, dot_precision

GROUP = 32      # weights per e8m0 scale


@triton.jit
def _e2m1(nib):
    """fp32 value of 4-bit e2m1 codes: sign bit 3, exponent bits 2..1, mantissa bit 0 (subnormal at exponent 0)."""
    e = (nib >> 1) & 3
    mant = (nib & 1).to(tl.float32) * 0.5
    mag = tl.where(e == 0, mant, (1.0 + mant) * tl.exp2((e - 1).to(tl.float32)))
    return tl.where((nib & 8) != 0, -mag, mag)


@triton.jit
def _mxfp4_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    j = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        col = k0 + 2 * j                                              # the even column of byte j
        ok = col < K
        packed = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + (k0 // 2 + j)[None, :],
                         mask=n_ok[:, None] & ok[None, :], other=0).to(tl.uint8).to(tl.int32)
        exp = tl.load(s_ptr + n[:, None].to(tl.int64) * stride_sn + (col // 32)[None, :],
                      mask=n_ok[:, None] & ok[None, :], other=127).to(tl.int32)
        scale = tl.exp2((exp - 127).to(tl.float32))
        w_lo = (_e2m1(packed & 15) * scale).to(x_ptr.dtype.element_ty)     # [BLOCK_N, BLOCK_K/2]
        w_hi = (_e2m1(packed >> 4) * scale).to(x_ptr.dtype.element_ty)
        x_ptrs = x_ptr + m[:, None].to(tl.int64) * stride_xm + col[None, :]
        x_mask = m_ok[:, None] & ok[None, :]
        x_even = tl.load(x_ptrs, mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptrs + 1, mask=x_mask, other=0.0)
        acc += tl.dot(x_even, tl.trans(w_lo), input_precision=PRECISION)
        acc += tl.dot(x_odd, tl.trans(w_hi), input_precision=PRECISION)
    tl.store(y_ptr + m[:, None].to(tl.int64) * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def mxfp4_matmul(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block_m: int = 16, block_n: int = 32,
                 block_k: int = 64) -> torch.Tensor:
    """x [M, K] (fp16 / bf16 / fp32) times the MXFP4 weight (w int8/uint8 [N, K/2], s uint8 [N, K/32])."""
    check_float("mxfp4_matmul", x=x)
    if x.dim() != 2 or w.dim() != 2 or s.dim() != 2 or w.dtype not in (torch.int8, torch.uint8) \
            or s.dtype != torch.uint8:
        raise ShapeError(f"mxfp4_matmul: want x [M, K], int8/uint8 w [N, K/2], uint8 s [N, K/32]; got x "
                         f"{list(x.shape)} {x.dtype}, w {list(w.shape)} {w.dtype}, s {list(s.shape)} {s.dtype}")
    m, k = x.shape
    n = w.shape[0]
    if k % GROUP or w.shape[1] * 2 != k or tuple(s.shape) != (n, k // GROUP):
        raise ShapeError(f"mxfp4_matmul: K={k} must be a multiple of {GROUP} with w [{n}, {k // 2}] and s "
                         f"[{n}, {k // GROUP}]; got w {list(w.shape)}, s {list(s.shape)}")
    x, w, s = x.contiguous(), w.contiguous(), s.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _mxfp4_gemm_kernel[grid](x, w, s, y, m, n, k, x.stride(0), w.stride(0), s.stride(0), y.stride(0),
                             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=dot_precision(x.dtype))
    return y
