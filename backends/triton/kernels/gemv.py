"""Decode GEMV: y [M, N] = x [M, K] @ w [N, K]^T (+ bias) for a few rows of x (M <= GEMV_ROWS), and its
per-head form `head_gemv` (y [M, H, N] from x [M, H, K] and w [H, N, K]).

Why: in a one-token decode step the dense projections are bandwidth-bound GEMVs over 2-420 MB weights. On the H100
cuBLAS's kernels for them ran at about 55 % of the copy bandwidth (V2-Lite decode profile: 1388 us of a 3627 us
step against a ~760 us floor; `benchmarks/profile_decode.py`). Here each program streams BLOCK_N weight rows once
for all M rows of x, accumulating in fp32 over BLOCK_K chunks (pipelined loads keep several chunks in flight).
No split-K: it would need a zeroed fp32 buffer and a second launch, which is what cuBLAS's split-K GEMVs pay for.

Launch configs: `gemv_candidates` lists the tiles that won `benchmarks/gemv_gpu.py`'s sweep at V2-Lite's shapes
on the H100 (whole 2048-wide rows, 2-4 rows a program, 4 stages); `tune=True` times them per shape (`autotune`).
In a V2-Lite decode step (B=1, T=4096) the template took the step from 3646.3 to 3540.1 us (same H100 run).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsgraph.errors import ShapeError

from ..autotune import cached, graph_ms, pick
from .common import check_device

GEMV_ROWS = 4  # rows of x up to which `gemv` is meant to run (beyond, tensor-core GEMMs win)
MAX_BLOCK_K = 2048  # the widest chunk of a weight row one load takes


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_xh, stride_wh, stride_wn, stride_wk,
                 stride_ym, stride_yh,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, h, n] = sum_k x[m, h, k] w[h, n, k] (+ bias[n]): program (i, h) takes BLOCK_N outputs of head h.
    Strides are arguments (Triton specialises the ones equal to 1), so any strided weight view loads correctly."""
    h = tl.program_id(1).to(tl.int64)
    x_ptr += h * stride_xh
    w_ptr += h * stride_wh
    y_ptr += h * stride_yh
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    n_ok, m_ok = n < N, m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def gemv_candidates(k: int) -> list[GemvConfig]:
    """Launch configs, the default first: 8 and 16 KB bf16 weight tiles, BLOCK_K as wide as the row (up to
    MAX_BLOCK_K) or half that. H100, bf16, one row (`benchmarks/gemv_gpu.py`, us, best vs cuBLAS):
    q_proj 3072x2048 4.7 vs 5.4 (4 rows a program), kv_a 576x2048 2.3 vs 5.7, o_proj 2048x2048 3.8 vs 4.9,
    lm_head 102400x2048 134.9 vs 149.5 (2 rows), shared_down 2048x2816 5.3 vs 6.5 (4 rows, 1024-wide chunks),
    shared_gate_up 5632x2048 7.4 vs 6.8 (8 rows, 1024-wide chunks)."""
    wide = max(64, min(MAX_BLOCK_K, triton.next_power_of_2(k)))
    narrow = max(32, wide // 2)
    return list(dict.fromkeys(GemvConfig(tile // bk, bk, 4, stages) for bk, stages in ((wide, 4), (narrow, 3))
                              for tile in (4096, 8192)))


def _check_rows(what: str, x: torch.Tensor, k: int, fix: str) -> None:
    if x.numel() > GEMV_ROWS * k:
        raise ShapeError(f"{what}: x {tuple(x.shape)} has more than {GEMV_ROWS} rows (each program holds all of "
                         f"them); use {fix} for GEMMs")


def _launch(what: str, x3: torch.Tensor, w3: torch.Tensor, bias, config, tune: bool) -> torch.Tensor:
    """y [M, H, N] for x3 [M, H, K] (unit last stride) and w3 [H, N, K] (any strides)."""
    (m, h, k), n = x3.shape, w3.shape[1]
    y = torch.empty((m, h, n), dtype=x3.dtype, device=x3.device)
    if y.numel() == 0:
        return y

    def run(cfg: GemvConfig):
        _gemv_kernel[(triton.cdiv(n, cfg.block_n), h)](
            x3, w3, bias if bias is not None else y, y, m, n, k, x3.stride(0), x3.stride(1), *w3.stride(),
            y.stride(0), y.stride(1), HAS_BIAS=bias is not None, BLOCK_M=triton.next_power_of_2(m),
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if config is None:
        cands = gemv_candidates(k)
        key = (h, n, k, w3.stride(2) == 1, triton.next_power_of_2(m), str(x3.dtype), bias is not None)
        config = pick(what, key, cands, run, timer=graph_ms) if tune else cached(what, key, cands) or cands[0]
    run(config)
    return y


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None, tune: bool = False) -> torch.Tensor:
    """`torch.nn.functional.linear(x, weight, bias)` for x [..., K] with few rows, in x's dtype (fp32 sums).

    The launch is `config` if given, else the tuned winner for (N, K, rows, dtype) if one is known (this process
    or the disk cache), else the first of `gemv_candidates`; tune=True times the candidates on first use of a
    shape (not during a CUDA-graph capture)."""
    check_device("gemv", x)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ShapeError(f"gemv: x [..., K] and weight [N, K]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ShapeError(f"gemv: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    lead, (n, k) = x.shape[:-1], weight.shape
    _check_rows("gemv", x, k, "torch.nn.functional.linear")
    x2 = x.reshape(-1, 1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    return _launch("gemv", x2, weight.unsqueeze(0), bias, config, tune).reshape(*lead, n)


def head_gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None,
              tune: bool = False) -> torch.Tensor:
    """y[..., h, n] = sum_k x[..., h, k] weight[h, n, k]: one GEMV per head, for few rows of x [..., H, K]:
    MLA's output absorb einsum at decode, W_UV [H, D, C] as stored. weight may be any strided view (a
    transposed W_UK works, but cuBLAS is faster there: `lowering/linear.py`)."""
    check_device("head_gemv", x)
    h, n, k = weight.shape if weight.dim() == 3 else (None, None, None)
    if weight.dim() != 3 or x.dim() < 2 or tuple(x.shape[-2:]) != (h, k):
        raise ShapeError(f"head_gemv: x [..., H, K] and weight [H, N, K]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    _check_rows("head_gemv", x, h * k, "torch.einsum")
    x3 = x.reshape(-1, h, k)
    x3 = x3 if x3.stride(-1) == 1 else x3.contiguous()
    return _launch("head_gemv", x3, weight, None, config, tune).reshape(*x.shape[:-1], n)
