"""FP8 block GEMM for `linear_fp8`: e4m3 weights [N, K] with fp32 scales per (bn x bk) block (DeepSeek-V3's
weight_scale_inv, edge blocks partial), fp32 accumulation.

Two modes, chosen per call:
- w8a8 (`act_quant=True`, DeepSeek's inference path, for Hopper+ GPUs): activations are quantised per token and
  per group of bk columns (scale = amax / 448) by `_act_quant_kernel`, the dot runs on fp8 operands, and each
  K block's partial sum is scaled by (activation scale x weight scale) before accumulation.
- w8a16 (`act_quant=False`): each weight tile is dequantised in registers and multiplied in the activation
  dtype — the `linear_fp8` reference's numerics (up to the tile's rounding to the activation dtype).
The K tile equals the weight's K block, so one weight scale per column and K step applies.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsgraph.errors import InputError, ShapeError

from ..autotune import bucket, pick
from .common import check_device, dot_precision, interpreting

FP8_MAX = 448.0


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, stride_s, GROUP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    cols = grp * GROUP + tl.arange(0, GROUP)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
    tl.store(q_ptr + row * stride_q + cols, (x / scale).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_s + grp, scale)


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                     stride_am, stride_ak, stride_asm, stride_bn, stride_bk, stride_bsn, stride_cm, stride_cn,
                     QBN: tl.constexpr, W8A8: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    bs_ptrs = bs_ptr + (offs_n // QBN) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        b_scale = tl.load(bs_ptrs + kb, mask=n_ok, other=0.0)
        if W8A8:
            a_scale = tl.load(as_ptr + offs_m * stride_asm + kb, mask=m_ok, other=0.0)
            if BLOCK_K >= 32:
                part = tl.dot(a, b)
            else:  # FP8 MMAs need K >= 32; e4m3 values are exact in fp16
                part = tl.dot(a.to(tl.float16), b.to(tl.float16))
            acc += part * a_scale[:, None] * b_scale[None, :]
        else:
            w = (b.to(tl.float32) * b_scale[None, :]).to(a.dtype)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def act_quant(x: torch.Tensor, group: int):
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, ceil(K / group)]): per-token, per-group amax / 448."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, triton.cdiv(k, group)), dtype=torch.float32, device=x.device)
    if m:
        _act_quant_kernel[(m, s.shape[1])](x, q, s, k, x.stride(0), q.stride(0), s.stride(0), GROUP=group)
    return q, s


def fp8_configs(m: int, block_k: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) candidates; BLOCK_K is the weight's K block."""
    if interpreting():
        return [(16, 16, 1, 1)]
    if m <= 16:
        return [(16, 64, 4, 4), (16, 128, 4, 3), (16, 32, 4, 4)]
    return [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (32, 128, 4, 4)]


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128),
               act_quant_input: bool = False) -> torch.Tensor:
    """x [..., K] @ dequant(weight [N, K], scale_inv).T -> [..., N] in x's dtype."""
    check_device("fp8_linear", x)
    if weight.dtype != torch.float8_e4m3fn:
        raise InputError(f"fp8_linear: weight must be float8_e4m3fn, got {weight.dtype}")
    bn, bk = block
    n, k = weight.shape
    if x.shape[-1] != k or scale_inv.shape != (triton.cdiv(n, bn), triton.cdiv(k, bk)):
        raise ShapeError(f"fp8_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, scales "
                         f"{tuple(scale_inv.shape)} do not fit {block} blocks")
    if bk < 16 or bk & (bk - 1):
        raise ShapeError(f"fp8_linear: the K block {bk} must be a power of two >= 16 (tl.dot tiles)")
    if interpreting() and x.dtype == torch.bfloat16 and not act_quant_input:
        raise InputError("fp8_linear: bf16 dots are wrong on Triton's interpreter; use fp16/fp32 on the CPU")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    a, a_scale = act_quant(x2, bk) if act_quant_input else (x2, x2)
    scale_inv = scale_inv.float().contiguous()

    def run(cfg):
        bm, bnt, warps, stages = cfg
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bnt))
        _fp8_gemm_kernel[grid](a, a_scale, weight, scale_inv, out, m, n, k, a.stride(0), a.stride(1),
                               a_scale.stride(0), weight.stride(0), weight.stride(1), scale_inv.stride(0),
                               out.stride(0), out.stride(1), QBN=bn, W8A8=act_quant_input,
                               PRECISION=dot_precision(x.dtype), BLOCK_M=bm, BLOCK_N=bnt, BLOCK_K=bk,
                               num_warps=warps, num_stages=stages)
        return out

    cfgs = [tuple(c) for c in fp8_configs(m, bk)]
    cfg = pick("fp8_linear", (n, k, bn, bk, bucket(m), act_quant_input, str(x.dtype)), [list(c) for c in cfgs],
               lambda c: run(tuple(c)))
    run(tuple(cfg))
    return out.reshape(*x.shape[:-1], n)
