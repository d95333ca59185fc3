"""Decode GEMV: y [M, N] = x [M, K] @ w [N, K]^T (+ bias) for a few rows of x (M <= GEMV_ROWS).

Why: in a one-token decode step the dense projections are bandwidth-bound GEMVs over 2-420 MB weights. On the H100
cuBLAS's kernels for them ran at about 55 % of the copy bandwidth (V2-Lite decode profile: 1388 us of a 3627 us
step against a ~760 us floor; `benchmarks/profile_decode.py`). Here each program streams BLOCK_N weight rows once
for all M rows of x, accumulating in fp32 over BLOCK_K chunks (pipelined loads keep several chunks in flight).
No split-K: it would need a zeroed fp32 buffer and a second launch, which is what cuBLAS's split-K GEMVs pay for.

Launch configs: `gemv_candidates` lists the tiles that won `benchmarks/gemv_gpu.py`'s sweep at V2-Lite's shapes
on the H100 (whole 2048-wide rows, 2-4 rows a program, 4 stages); `tune=True` times them per shape (`autotune`).
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
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    n_ok, m_ok = n < N, m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def gemv_candidates(k: int) -> list[GemvConfig]:
    """Launch configs, the default first. H100, bf16, one row (`benchmarks/gemv_gpu.py`, us, best vs cuBLAS):
    q_proj 3072x2048 4.7 vs 5.4 (4 rows a program), kv_a 576x2048 2.3 vs 5.7, o_proj 2048x2048 3.8 vs 4.9,
    lm_head 102400x2048 134.9 vs 149.5 (2 rows), shared_down 2048x2816 5.3 vs 6.5 (4 rows, 1024-wide chunks),
    shared_gate_up 5632x2048 7.4 vs 6.8 (8 rows, 1024-wide chunks)."""
    block_k = max(64, min(MAX_BLOCK_K, triton.next_power_of_2(k)))
    narrow = max(64, block_k // 2)
    return list(dict.fromkeys([GemvConfig(2, block_k, 4, 4), GemvConfig(4, block_k, 4, 4),
                               GemvConfig(4, narrow, 4, 3), GemvConfig(8, narrow, 4, 3)]))



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
    if x.numel() > GEMV_ROWS * k:
        raise ShapeError(f"gemv: x {tuple(x.shape)} has more than {GEMV_ROWS} rows (each program holds all of them); "
                         "use torch.nn.functional.linear for GEMMs")
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)

    def run(cfg: GemvConfig):
        _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
            x2, weight, bias if bias is not None else y, y, m, n, k, x2.stride(0), weight.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if config is None:
        cands, key = gemv_candidates(k), (n, k, triton.next_power_of_2(m), str(x.dtype), bias is not None)
        config = pick("gemv", key, cands, run, timer=graph_ms) if tune else cached("gemv", key, cands) or cands[0]
    run(config)
    return y.reshape(*lead, n)
