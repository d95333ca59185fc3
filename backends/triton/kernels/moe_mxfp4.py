"""The fused MoE straight off MXFP4 expert weights (DeepSeek-V4's routed experts): the grouped gate|up GEMM with
the (clamped) SwiGLU and the grouped down GEMM with the routing weight, each reading its expert's packed e2m1
nibbles and e8m0 scales and decoding them in registers; alignment, tiles and the final reduce are `moe.fused_moe`'s
(`run_fused_moe`).

Why: a decode-sized expert GEMM is bound by the weight bytes it reads, and Hopper has no FP4 tensor cores. Half a
byte a weight plus a byte per 32 for the scale is ~1/4 of the bf16 weight's bytes; the tensor-core dot runs in the
activation dtype with fp32 accumulation. Weights: gate_up [E, 2I, H/2] int8/uint8 (gate rows first, two values a
byte, low nibble first) with scales [E, 2I, H/32] uint8 (2**(s - 127) per 32 along H); down [E, H, I/2] with
[E, H, I/32].

Two decodes, both candidates of the autotuner (`native` in the config): ours (any float dtype: the low and high
nibbles of a byte meet x's even and odd columns, so no register interleave is needed; each value is built from
its bits, no lookup table or exp2), and Triton's `tl.dot_scaled` (bf16 / fp16 activations), whose Hopper lowering
upcasts e2m1 to the activation dtype in registers with its own conversion code (unpipelined: `mxfp4_configs`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsgraph.errors import InputError, ShapeError

from .common import check_float, dot_precision, interpreting
from .moe import MoEConfig, moe_configs, run_fused_moe, store_rows, tile_rows

GROUP = 32      # weights per e8m0 scale


@dataclass(frozen=True)
class MXFP4Config(MoEConfig):
    native: bool = False   # tl.dot_scaled instead of our decode (bf16 / fp16 activations)
    gemv: int = 0          # > 0: no tensor cores, the tile's valid rows taken `gemv` at a time (decode)


def mxfp4_configs(m: int, num_experts: int, block_m: int | None = None) -> list[MXFP4Config]:
    """The bf16 template's tiles with K tiles of at least 64 (so each even/odd half is a 32-deep dot) and deeper
    K tiles for decode (a tile row is half the bytes it is in bf16), each with both decodes on the GPU.
    `tl.dot_scaled` candidates are not software-pipelined: on the H200 (Triton 3.6) every one with num_stages > 1
    gave wrong sums (rel err ~1.4) while num_stages = 1 and our decode at any depth were exact
    (tests/test_triton_mxfp4.py checks each candidate on CUDA)."""
    base = moe_configs(m, num_experts, block_m)
    if interpreting():
        return [MXFP4Config(**{**c.__dict__, "block_k": max(c.block_k, 64)}) for c in base]
    tiles = {(c.block_m, c.block_n, max(c.block_k, 64), c.num_warps, c.num_stages) for c in base}
    if base[0].block_m <= 16:
        tiles |= {(16, 64, 256, 4, 4), (16, 128, 256, 4, 3), (16, 64, 512, 4, 3), (16, 32, 512, 4, 4)}
    ours = [MXFP4Config(*t, native=False) for t in sorted(tiles)]
    native = {MXFP4Config(bm, bn, bk, w, 1, native=True) for bm, bn, bk, w, _ in tiles}
    gemv = [MXFP4Config(base[0].block_m, bn, bk, 4, st, gemv=sub) for bn, bk in ((16, 1024), (32, 512), (64, 256))
            for st in (1, 2) for sub in (1, 2)] if base[0].block_m <= 16 else []
    return ours + sorted(native, key=str) + gemv


@triton.jit
def _e2m1(nib, scale):
    """fp32 values of 4-bit e2m1 codes (sign bit 3, exponent bits 2..1, mantissa bit 0) times `scale`, built from
    their bits: a code c >= 2 of the magnitude is 2**(e - 1) * (1 + m / 2), i.e. fp32 bits (c << 22) + 0x3F000000
    (the bits of 0.5); c == 1 is 0.5 (the subnormal), c == 0 is 0."""
    c = nib & 7
    bits = tl.where(c >= 2, (c << 22) + 0x3F000000, tl.where(c == 1, 0x3F000000, 0)) | ((nib & 8) << 28)
    return bits.to(tl.float32, bitcast=True) * scale


@triton.jit
def _scale(exp):
    """2**(exp - 127) of e8m0 bytes from their bits (exp 0 is the fp32 subnormal 2**-127, 255 is inf as 2**128)."""
    return tl.where(exp == 0, 5.877471754111438e-39, (exp << 23).to(tl.float32, bitcast=True))


@triton.jit
def _mxfp4_dot(acc, a_ptr, a_row, row_ok, k0, K, w_ptr, s_ptr, offs_n, n_ok, stride_wn, stride_sn,
               PRECISION: tl.constexpr, NATIVE: tl.constexpr, A_FMT: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + A[rows, k0:k0+BLOCK_K] @ dequant(W[n, k0:k0+BLOCK_K])^T for one expert's W (w_ptr, s_ptr at it)."""
    j = tl.arange(0, BLOCK_K // 2)              # byte j holds columns k0 + 2j (low nibble) and k0 + 2j + 1
    col = k0 + 2 * j
    ok = col < K
    w_mask = ok[:, None] & n_ok[None, :]
    packed = tl.load(w_ptr + offs_n[None, :] * stride_wn + (k0 // 2 + j)[:, None], mask=w_mask, other=0)
    if NATIVE:
        g = tl.arange(0, BLOCK_K // 32)
        g_ok = k0 + 32 * g < K
        exp = tl.load(s_ptr + offs_n[:, None] * stride_sn + (k0 // 32 + g)[None, :],
                      mask=n_ok[:, None] & g_ok[None, :], other=127)
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + a_row[:, None] * K + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)
        acc = tl.dot_scaled(a, None, A_FMT, packed.to(tl.uint8, bitcast=True), exp.to(tl.uint8), "e2m1", acc)
    else:
        byte = packed.to(tl.uint8, bitcast=True).to(tl.int32)
        scale = _scale(tl.load(s_ptr + offs_n[None, :] * stride_sn + (col // 32)[:, None], mask=w_mask,
                               other=127).to(tl.int32))
        dt = a_ptr.dtype.element_ty
        a_ptrs = a_ptr + a_row[:, None] * K + col[None, :]
        a_mask = row_ok[:, None] & ok[None, :]
        acc = tl.dot(tl.load(a_ptrs, mask=a_mask, other=0.0), _e2m1(byte & 15, scale).to(dt), acc,
                     input_precision=PRECISION)
        acc = tl.dot(tl.load(a_ptrs + 1, mask=a_mask, other=0.0), _e2m1(byte >> 4, scale).to(dt), acc,
                     input_precision=PRECISION)
    return acc


@triton.jit
def _gemv_part(w_ptr, s_ptr, k0, K, offs_n, n_ok, stride_wn, stride_sn, x_even, x_odd, BLOCK_K: tl.constexpr):
    """sum_k x[rows, k] * dequant(W)[n, k] over one K chunk without tensor cores: [SUB, BLOCK_N]. The codes stay
    in the layout they were loaded in (a dot would stage them through shared memory) and each group of 32 is
    summed before its one scale multiplies it. W viewed [BLOCK_N, groups, 16 bytes]; x_* [SUB, groups, 16]."""
    g = tl.arange(0, BLOCK_K // 32)
    t = tl.arange(0, 16)
    byte_k = (k0 // 2 + g * 16)[:, None] + t[None, :]                      # [G, 16] byte offsets along K
    ok = (2 * byte_k < K)[None, :, :] & n_ok[:, None, None]
    byte = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + byte_k[None, :, :], mask=ok, other=0)
    byte = byte.to(tl.uint8, bitcast=True).to(tl.int32)
    exp = tl.load(s_ptr + offs_n[:, None] * stride_sn + (k0 // 32 + g)[None, :],
                  mask=n_ok[:, None] & (k0 + 32 * g < K)[None, :], other=127).to(tl.int32)
    lo, hi = _e2m1(byte & 15, 1.0), _e2m1(byte >> 4, 1.0)                 # [BLOCK_N, G, 16]
    per_group = tl.sum(lo[None] * x_even[:, None] + hi[None] * x_odd[:, None], axis=3)   # [SUB, BLOCK_N, G]
    return tl.sum(per_group * _scale(exp)[None], axis=2)


@triton.jit
def _gemv_rows(acc, acc_up, a_ptr, a_row, row_ok, K, w_ptr, s_ptr, offs_n, n_ok, N, stride_wn, stride_sn,
               SWIGLU: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (and, SWIGLU, acc_up from the up rows after the N gate rows) + A[a_row] @ dequant(W)^T, SUB rows."""
    g = tl.arange(0, BLOCK_K // 32)
    t = tl.arange(0, 16)
    for k0 in range(0, K, BLOCK_K):
        col = (k0 + 32 * g)[:, None] + 2 * t[None, :]                      # [G, 16] even columns
        x_ptrs = a_ptr + a_row[:, None, None] * K + col[None, :, :]
        x_ok = row_ok[:, None, None] & (col < K)[None, :, :]
        x_even = tl.load(x_ptrs, mask=x_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptrs + 1, mask=x_ok, other=0.0).to(tl.float32)
        acc += _gemv_part(w_ptr, s_ptr, k0, K, offs_n, n_ok, stride_wn, stride_sn, x_even, x_odd, BLOCK_K)
        if SWIGLU:
            acc_up += _gemv_part(w_ptr + N * stride_wn, s_ptr + N * stride_sn, k0, K, offs_n, n_ok, stride_wn,
                                 stride_sn, x_even, x_odd, BLOCK_K)
    return acc, acc_up


@triton.jit
def _grouped_mxfp4_kernel(
    a_ptr, w_ptr, s_ptr, c_ptr, row_ids_ptr, block_expert_ptr, rw_ptr, num_rows, N, K,
    stride_we, stride_wn, stride_se, stride_sn, stride_cm, stride_cn, limit,
    A_DIV: tl.constexpr, A_PADDED: tl.constexpr, C_PADDED: tl.constexpr, SWIGLU: tl.constexpr,
    CLAMP: tl.constexpr, HAS_WEIGHT: tl.constexpr, PRECISION: tl.constexpr, NATIVE: tl.constexpr,
    A_FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GEMV: tl.constexpr,
):
    """`moe._grouped_gemm_kernel` (same rows, SwiGLU and routing-weight epilogue) with B = dequant(W[e], S[e]):
    every program reads its expert's packed rows and scales once for its BLOCK_M rows (GEMV: once per GEMV of
    its valid rows, which alignment puts first in the tile; decode tiles hold one or two). A is contiguous."""
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    s_base = s_ptr + expert.to(tl.int64) * stride_se
    if GEMV > 0:
        _, _, _, tile_ok = tile_rows(row_ids_ptr, block_expert_ptr, num_rows, BLOCK_M)
        for r0 in range(0, tl.sum(tile_ok.to(tl.int32)), GEMV):
            pos = tl.program_id(0) * BLOCK_M + r0 + tl.arange(0, GEMV)
            sub_ok = r0 + tl.arange(0, GEMV) < BLOCK_M
            row_id = tl.load(row_ids_ptr + pos, mask=sub_ok, other=num_rows)
            row_ok = row_id < num_rows
            a_row = pos.to(tl.int64) if A_PADDED else (row_id // A_DIV)
            acc, acc_up = _gemv_rows(tl.zeros((GEMV, BLOCK_N), dtype=tl.float32),
                                     tl.zeros((GEMV, BLOCK_N), dtype=tl.float32), a_ptr, a_row, row_ok, K, w_base,
                                     s_base, offs_n, n_ok, N, stride_wn, stride_sn, SWIGLU, BLOCK_K)
            store_rows(acc, acc_up, c_ptr, rw_ptr, pos, row_id, row_ok, offs_n, n_ok, stride_cm, stride_cn, limit,
                       C_PADDED, SWIGLU, CLAMP, HAS_WEIGHT)
        return
    _, pos, row_id, row_ok = tile_rows(row_ids_ptr, block_expert_ptr, num_rows, BLOCK_M)
    a_row = pos.to(tl.int64) if A_PADDED else (row_id // A_DIV)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = _mxfp4_dot(acc, a_ptr, a_row, row_ok, k0, K, w_base, s_base, offs_n, n_ok, stride_wn, stride_sn,
                         PRECISION, NATIVE, A_FMT, BLOCK_K)
        if SWIGLU:   # the up rows follow the N gate rows
            acc_up = _mxfp4_dot(acc_up, a_ptr, a_row, row_ok, k0, K, w_base + N * stride_wn,
                                s_base + N * stride_sn, offs_n, n_ok, stride_wn, stride_sn, PRECISION, NATIVE,
                                A_FMT, BLOCK_K)
    store_rows(acc, acc_up, c_ptr, rw_ptr, pos, row_id, row_ok, offs_n, n_ok, stride_cm, stride_cn, limit,
               C_PADDED, SWIGLU, CLAMP, HAS_WEIGHT)


def _launch(a, w, s, c, row_ids, block_expert, rw, num_rows, n, cfg: MXFP4Config, *, a_div=1, a_padded=False,
            c_padded=False, swiglu=False, limit=None):
    if cfg.native and a.dtype == torch.float32:
        raise InputError("fused_moe_mxfp4: tl.dot_scaled takes bf16 / fp16 activations; use native=False for fp32")
    if cfg.native and cfg.num_stages > 1 and not interpreting():
        raise InputError(f"fused_moe_mxfp4: {cfg} pipelines tl.dot_scaled, which gave wrong sums on the H200 "
                         "(Triton 3.6); use num_stages=1 with native=True")
    grid = (block_expert.numel(), triton.cdiv(n, cfg.block_n))
    _grouped_mxfp4_kernel[grid](
        a, w, s, c, row_ids, block_expert, rw if rw is not None else c, num_rows, n, a.shape[1],
        w.stride(0), w.stride(1), s.stride(0), s.stride(1), c.stride(0), c.stride(1), float(limit or 0.0),
        A_DIV=a_div, A_PADDED=a_padded, C_PADDED=c_padded, SWIGLU=swiglu, CLAMP=limit is not None,
        HAS_WEIGHT=rw is not None, PRECISION=dot_precision(a.dtype), NATIVE=cfg.native,
        A_FMT="bf16" if a.dtype == torch.bfloat16 else "fp16", BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GEMV=cfg.gemv, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _check(x, weights, ids, gate_up, gate_up_scale, down, down_scale):
    check_float("fused_moe_mxfp4", x=x)
    for name, t, dt in (("gate_up", gate_up, (torch.int8, torch.uint8)), ("down", down, (torch.int8, torch.uint8)),
                        ("gate_up_scale", gate_up_scale, (torch.uint8,)), ("down_scale", down_scale, (torch.uint8,))):
        if t.dtype not in dt or t.dim() != 3 or not t.is_contiguous():
            raise ShapeError(f"fused_moe_mxfp4: {name} must be contiguous 3-D {' or '.join(map(str, dt))}; got "
                             f"{t.dtype} {tuple(t.shape)}")
    e, i2, half_h = gate_up.shape
    h, inter = 2 * half_h, i2 // 2
    want = {"gate_up_scale": (e, i2, h // GROUP), "down": (e, h, inter // 2), "down_scale": (e, h, inter // GROUP)}
    got = {"gate_up_scale": gate_up_scale.shape, "down": down.shape, "down_scale": down_scale.shape}
    if x.dim() != 2 or x.shape[1] != h or i2 % 2 or h % GROUP or inter % GROUP or any(
            tuple(got[k]) != v for k, v in want.items()):
        raise ShapeError(f"fused_moe_mxfp4: x [N, H] with H, I multiples of {GROUP}, gate_up [E, 2I, H/2], "
                         f"gate_up_scale [E, 2I, H/32], down [E, H, I/2], down_scale [E, H, I/32]; got x "
                         f"{tuple(x.shape)}, gate_up {tuple(gate_up.shape)}, "
                         + ", ".join(f"{k} {tuple(v)}" for k, v in got.items()))
    if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ShapeError(f"fused_moe_mxfp4: ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be "
                         f"[N={x.shape[0]}, k]")


def fused_moe_mxfp4(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                    gate_up_scale: torch.Tensor, down: torch.Tensor, down_scale: torch.Tensor,
                    config: MXFP4Config | tuple[MXFP4Config, MXFP4Config] | None = None,
                    limit: float | None = None, native: bool | None = None) -> torch.Tensor:
    """`moe.fused_moe(x, weights, ids, dequant(gate_up), dequant(down), limit=limit)` without dequantising:
    the weights stay MXFP4 (shapes in the module docstring). `config` as for fused_moe (MXFP4Config tiles);
    `native` restricts the autotuned candidates to one decode (None: both; fp32 has ours only)."""
    _check(x, weights, ids, gate_up, gate_up_scale, down, down_scale)
    x = x.contiguous()
    packs = {"gate_up": (gate_up, gate_up_scale), "down": (down, down_scale)}
    allowed = {False} if x.dtype == torch.float32 else {False, True} if native is None else {native}

    def launch(stage, a, c, *args, **kw):
        _launch(a, *packs[stage], c, *args, **kw)

    def configs(m, e, block_m):
        return [c for c in mxfp4_configs(m, e, block_m) if c.native in allowed]
    name = "fused_moe_mxfp4" if native is None else f"fused_moe_mxfp4_{'native' if native else 'ours'}"
    return run_fused_moe(x, weights, ids, gate_up.shape[0], gate_up.shape[1] // 2, launch, name, configs, config,
                         limit)
