"""Grouped-GEMM mixture of experts: align token copies by expert, gate|up GEMM with fused SwiGLU, down GEMM with the
routing weight fused, then an un-permute that sums each token's k rows.

Why this shape (vLLM's fused_moe, DeepSeek's naive loop as the reference): every token copy (token t, slot j) is a
row of expert ids[t, j]'s GEMM. The copies are sorted by expert and each expert's run padded to a multiple of
BLOCK_M, entirely on the device (no host sync, so it works under CUDA graphs): one M tile of a GEMM then belongs to
one expert. A single token needs none of that: its k slots name k experts, so each slot is a tile of its own
(`one_token_tiles`, no kernel). For decode batches and short prompts (rows x experts <= ALIGN_KERNEL_WORK) one
program aligns (`_align_kernel`: one launch instead of ~15 small torch ops, which were most of a decode step's MoE
time; H100, V2-Lite, 64 tokens: 11 us); above, its one-hot passes grow with rows x experts and `align` sorts
with torch. Tiles past the real ones see expert -1 and exit. The gate|up GEMM reads x rows straight through the
sorted slot ids (x_perm is never materialised) and writes silu(gate) * up for the padded rows; the down GEMM
multiplies by the slot's routing weight and writes fp32 rows per slot; `_reduce_kernel` sums the k slots of each
token in fp32 and casts once, as the reference accumulates.

Weights are stacked per expert: gate_up [E, 2I, H] (gate rows first), down [E, H, I].
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from dsgraph.errors import ShapeError

from ..autotune import bucket, pick
from .common import check_float, dot_precision, interpreting


@dataclass(frozen=True)
class MoEConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


INTERPRETER_CONFIG = MoEConfig(16, 16, 16, 1, 1)
ALIGN_KERNEL_WORK = 1 << 16  # rows x experts (padded) up to which one program aligns


def moe_block_m(m: int, num_experts: int) -> int:
    """The M tile both GEMMs share (the alignment pads to it): about the rows an expert gets on average, so few
    tile rows are padding."""
    per_expert = m / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64


def moe_configs(m: int, num_experts: int, block_m: int | None = None) -> list[MoEConfig]:
    """Tile candidates for one GEMM at M tile `block_m` (default `moe_block_m`): decode reads each hit expert's
    weights once through few rows, so narrow N tiles over deep K stages keep enough loads in flight; prefill
    tiles are compute tiles. Timed per GEMM by `pick` (the two GEMMs differ in N, K and the SwiGLU epilogue)."""
    if interpreting():   # the M tile must be the one the rows were aligned to (fused_moe pads to moe_block_m)
        return [replace(INTERPRETER_CONFIG, block_m=block_m or INTERPRETER_CONFIG.block_m)]
    bm = block_m or moe_block_m(m, num_experts)
    if bm <= 16:
        tiles = [(64, 128, 4, 4), (32, 128, 4, 4), (32, 256, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3),
                 (128, 256, 4, 4), (128, 128, 8, 3)]
    elif bm <= 32:
        tiles = [(64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 5), (128, 128, 8, 3)]
    else:
        tiles = [(128, 64, 4, 4), (64, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3)]
    return [MoEConfig(bm, bn, bk, w, st) for bn, bk, w, st in tiles]


# ------------------------------------------------------------------------------------------------ alignment

def align(expert_of_row: torch.Tensor | None, counts: torch.Tensor, num_rows: int, block_m: int):
    """Sort rows by expert and pad each expert's run to a multiple of block_m.

    `expert_of_row` [R] gives each row's expert (None: rows are already sorted, `counts` per expert). Returns
    (row_ids [P] with `num_rows` marking padding, block_expert [P / block_m] with -1 for unused tiles).
    P is the static bound R + E * (block_m - 1), so nothing here waits for the device.
    """
    e = counts.numel()
    dev = counts.device
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    cap = triton.cdiv(num_rows + e * (block_m - 1), block_m) * block_m
    if expert_of_row is None:
        rows = torch.arange(num_rows, device=dev)
        experts = torch.repeat_interleave(torch.arange(e, device=dev), counts, output_size=num_rows)
        order = rows
    else:
        order = torch.argsort(expert_of_row, stable=True)
        experts = expert_of_row[order]
        rows = torch.arange(num_rows, device=dev)
    first = torch.cumsum(counts, 0) - counts  # first sorted position of each expert
    dest = starts[experts] + (rows - first[experts])
    row_ids = torch.full((cap,), num_rows, dtype=torch.int64, device=dev)
    row_ids[dest] = order
    tile_start = torch.arange(0, cap, block_m, device=dev)
    block_expert = torch.searchsorted(ends, tile_start, right=True)
    block_expert = torch.where(block_expert < e, block_expert, -1)
    return row_ids, block_expert


def expert_counts(expert_of_row: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows per expert [E] int64. Unlike torch.bincount, which sizes its output from the largest id (a wait for
    the device), this never syncs, so a CUDA graph can capture it."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_of_row.device)
    return counts.scatter_add_(0, expert_of_row, torch.ones_like(expert_of_row))


_ONE_TOKEN_ROWS: dict[tuple, torch.Tensor] = {}


def one_token_tiles(expert_of_row: torch.Tensor, block_m: int):
    """`align`'s result for one token's k rows, laid out one row per tile (row j at position j * block_m, the
    rest padding; tile j belongs to expert_of_row[j]): top-k experts are distinct, so the weights are read once
    each, as after sorting, and the layout is a constant (H100, V2-Lite decode: the align launch took 5.7 us of
    the ~150 us of a layer). Repeated experts stay correct, only read twice."""
    m = expert_of_row.numel()
    key = (m, block_m, expert_of_row.device)
    row_ids = _ONE_TOKEN_ROWS.get(key)
    if row_ids is None:
        row_ids = torch.full((m, block_m), m, dtype=torch.int64, device=expert_of_row.device)
        row_ids[:, 0] = torch.arange(m, device=expert_of_row.device)
        row_ids = _ONE_TOKEN_ROWS[key] = row_ids.reshape(-1)
    return row_ids, expert_of_row


def align_rows(expert_of_row: torch.Tensor, num_experts: int, block_m: int):
    """`align(expert_of_row, expert_counts(expert_of_row), R, block_m)`, in one launch of `_align_kernel` when
    R x experts <= ALIGN_KERNEL_WORK (same sorted order: stable, by expert)."""
    num_rows = expert_of_row.numel()
    block_e = max(16, triton.next_power_of_2(num_experts))
    if num_rows * block_e > ALIGN_KERNEL_WORK:
        return align(expert_of_row, expert_counts(expert_of_row, num_experts), num_rows, block_m)
    dev = expert_of_row.device
    cap = triton.cdiv(num_rows + num_experts * (block_m - 1), block_m) * block_m
    row_ids = torch.empty(cap, dtype=torch.int64, device=dev)
    block_expert = torch.empty(cap // block_m, dtype=torch.int64, device=dev)
    _align_kernel[(1,)](expert_of_row, row_ids, block_expert, num_rows, num_experts, cap, cap // block_m,
                        BLOCK_M=block_m, BLOCK_R=max(16, min(128, 8192 // block_e)), BLOCK_E=block_e,
                        BLOCK_FILL=1024, num_warps=4 if block_e <= 64 else 8)
    return row_ids, block_expert


@triton.jit
def _align_kernel(ids_ptr, row_ids_ptr, block_expert_ptr, num_rows, num_experts, cap, num_tiles,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_FILL: tl.constexpr):
    """One program: count rows per expert, lay out each expert's run padded to BLOCK_M, then scatter every row
    to its place (its rank among its expert's rows, by a cumulative sum over one-hot chunks of BLOCK_R rows)."""
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for r0 in range(0, num_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ids = tl.load(ids_ptr + rows, mask=rows < num_rows, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    for p0 in range(0, cap, BLOCK_FILL):  # every slot starts as padding (row id == num_rows)
        pos = p0 + tl.arange(0, BLOCK_FILL)
        tl.store(row_ids_ptr + pos, tl.full([BLOCK_FILL], 0, tl.int64) + num_rows, mask=pos < cap)
    e_ok = experts < num_experts
    for t0 in range(0, num_tiles, BLOCK_R):  # a tile's expert: how many experts' runs end at or before it
        tiles = t0 + tl.arange(0, BLOCK_R)
        owner = tl.sum(((ends[None, :] <= tiles[:, None] * BLOCK_M) & e_ok[None, :]).to(tl.int32), 1)
        tl.store(block_expert_ptr + tiles, tl.where(owner < num_experts, owner, -1).to(tl.int64),
                 mask=tiles < num_tiles)
    tl.debug_barrier()  # the padding fill lands before the scatter overwrites it
    next_slot = ends - padded  # per expert: where its next row goes
    for r0 in range(0, num_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ids = tl.load(ids_ptr + rows, mask=rows < num_rows, other=-1)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
        dest = tl.sum(onehot * (tl.cumsum(onehot, 0) - onehot + next_slot[None, :]), 1)
        tl.store(row_ids_ptr + dest, rows.to(tl.int64), mask=rows < num_rows)
        next_slot += tl.sum(onehot, 0)


# ------------------------------------------------------------------------------------------------ kernels

@triton.jit
def tile_rows(row_ids_ptr, block_expert_ptr, num_rows, BLOCK_M: tl.constexpr):
    """This program's M tile: (expert, or -1 for an unused tile; padded positions; their row ids; valid rows)."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_id = tl.load(row_ids_ptr + pos)
    return expert, pos, row_id, row_id < num_rows


@triton.jit
def store_rows(acc, acc_up, c_ptr, w_ptr, pos, row_id, row_ok, offs_n, n_ok, stride_cm, stride_cn, limit,
               C_PADDED: tl.constexpr, SWIGLU: tl.constexpr, CLAMP: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """The grouped GEMMs' epilogue: SwiGLU of (gate, up) accumulators (CLAMP: V4's limits first), the routing
    weight w[row_id] (HAS_WEIGHT), then the rows stored at their padded position (C_PADDED) or row id."""
    if SWIGLU:
        if CLAMP:
            acc = tl.minimum(acc, limit)
            acc_up = tl.minimum(tl.maximum(acc_up, -limit), limit)
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if HAS_WEIGHT:
        acc = acc * tl.load(w_ptr + row_id, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    c_row = pos.to(tl.int64) if C_PADDED else row_id
    c_ptrs = c_ptr + c_row[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, row_ids_ptr, block_expert_ptr, w_ptr,
    num_rows, N, K,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, limit,
    A_DIV: tl.constexpr, A_PADDED: tl.constexpr, C_PADDED: tl.constexpr, SWIGLU: tl.constexpr,
    CLAMP: tl.constexpr, HAS_WEIGHT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[rows] = A[rows] @ B[e].T for the rows of one expert tile.

    A rows: padded position (A_PADDED) or row_id // A_DIV (a token's x for each of its k slots). C rows: padded
    position (C_PADDED) or row_id. SWIGLU: B holds [gate; up] (2N rows) and C = silu(A B_g^T) * (A B_u^T);
    CLAMP (DeepSeek-V4): the gate clamped above at `limit`, the up part to [-limit, limit] first.
    HAS_WEIGHT: each row is scaled by w[row_id] (the routing weight of that slot).
    """
    expert, pos, row_id, row_ok = tile_rows(row_ids_ptr, block_expert_ptr, num_rows, BLOCK_M)
    if expert < 0:
        return
    a_row = pos.to(tl.int64) if A_PADDED else (row_id // A_DIV)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_base = b_ptr + expert.to(tl.int64) * stride_be
    b_ptrs = b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if SWIGLU:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    store_rows(acc, acc_up, c_ptr, w_ptr, pos, row_id, row_ok, offs_n, n_ok, stride_cm, stride_cn, limit,
               C_PADDED, SWIGLU, CLAMP, HAS_WEIGHT)


@triton.jit
def _reduce_kernel(y_ptr, src_ptr, w_ptr, out_ptr, H, stride_y, stride_out,
                   TOP_K: tl.constexpr, GATHER: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = sum_j y[src[t*K + j]] * w[t*K + j] (GATHER), or sum_j y[t*K + j], accumulated in fp32."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = t * TOP_K + j
        if GATHER:
            row = tl.load(src_ptr + row)
        y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + t * TOP_K + j).to(tl.float32)
        acc += y
    tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ host side

def _launch_gemm(a, b, c, row_ids, block_expert, w, num_rows, n, cfg: MoEConfig, *, a_div=1, a_padded=False,
                 c_padded=False, swiglu=False, limit=None):
    grid = (block_expert.numel(), triton.cdiv(n, cfg.block_n))
    _grouped_gemm_kernel[grid](
        a, b, c, row_ids, block_expert, w if w is not None else c, num_rows, n, a.shape[1],
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        float(limit or 0.0), A_DIV=a_div, A_PADDED=a_padded, C_PADDED=c_padded, SWIGLU=swiglu,
        CLAMP=limit is not None, HAS_WEIGHT=w is not None,
        PRECISION=dot_precision(a.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _reduce(y, src, w, out, top_k):
    n, h = out.shape
    if n == 0:
        return out
    block = min(triton.next_power_of_2(h), 1024)
    _reduce_kernel[(n, triton.cdiv(h, block))](
        y, src if src is not None else y, w if w is not None else y, out, h, y.stride(0), out.stride(0),
        TOP_K=top_k, GATHER=src is not None, HAS_WEIGHT=w is not None, BLOCK=block,
        num_warps=4 if block >= 512 else 1)
    return out


def _check_moe(x, weights, ids, gate_up, down):
    check_float("fused_moe", x=x, gate_up=gate_up, down=down)
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise ShapeError(f"fused_moe: x must be [N, H], gate_up [E, 2I, H], down [E, H, I]; got {tuple(x.shape)}, "
                         f"{tuple(gate_up.shape)}, {tuple(down.shape)}")
    e, i2, h = gate_up.shape
    if h != x.shape[1] or i2 % 2 or down.shape != (e, h, i2 // 2):
        raise ShapeError(f"fused_moe: gate_up {tuple(gate_up.shape)} / down {tuple(down.shape)} do not fit "
                         f"x {tuple(x.shape)} (need [E, 2I, H] and [E, H, I])")
    if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ShapeError(f"fused_moe: ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be "
                         f"[N={x.shape[0]}, k]")


def fused_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
              down: torch.Tensor, config: MoEConfig | tuple[MoEConfig, MoEConfig] | None = None,
              limit: float | None = None) -> torch.Tensor:
    """sum_j weights[t, j] * SwiGLU_{ids[t, j]}(x[t]) -> [N, H] in x's dtype (`moe_experts_ref` semantics;
    `limit`: V4's clamped SwiGLU, act.swiglu_clamped).

    `config`: one launch config for both GEMMs, a (gate|up, down) pair sharing block_m, or None: block_m from
    `moe_block_m` and each GEMM's tiles autotuned on its own."""
    _check_moe(x, weights, ids, gate_up, down)
    e, i2, _ = gate_up.shape

    def launch(stage, a, c, *args, **kw):
        _launch_gemm(a, gate_up if stage == "gate_up" else down, c, *args, **kw)
    return run_fused_moe(x, weights, ids, e, i2 // 2, launch, "fused_moe", moe_configs, config, limit)


def run_fused_moe(x, weights, ids, num_experts: int, inter: int, launch, name: str, configs, config=None,
                  limit=None) -> torch.Tensor:
    """The fused MoE's host side, whatever the weights' format: align the token copies by expert, then
    `launch(stage, a, c, row_ids, block_expert, w, num_rows, n, cfg, **epilogue)` for stage "gate_up" (SwiGLU)
    and "down" (routing weight), each tile autotuned among `configs(m, num_experts, block_m)` under
    `<name>_<stage>`, then the k slots of each token summed."""
    n, h = x.shape
    k = ids.shape[1]
    m = n * k
    out = torch.empty_like(x)
    if n == 0:
        return out
    up_cfg, down_cfg = (config, config) if isinstance(config, MoEConfig) else config or (None, None)
    if up_cfg is not None and up_cfg.block_m != down_cfg.block_m:
        raise ShapeError(f"{name}: both GEMMs share one M tile; got block_m {up_cfg.block_m} and "
                         f"{down_cfg.block_m}")
    block_m = up_cfg.block_m if up_cfg is not None else moe_block_m(m, num_experts)
    flat_w = weights.reshape(-1).float().contiguous()
    flat_ids = ids.reshape(-1)
    row_ids, block_expert = (one_token_tiles(flat_ids, block_m) if n == 1
                             else align_rows(flat_ids, num_experts, block_m))
    act = torch.empty((row_ids.numel(), inter), dtype=x.dtype, device=x.device)
    y = torch.empty((m, h), dtype=torch.float32, device=x.device)

    def gate_up_gemm(cfg):
        launch("gate_up", x, act, row_ids, block_expert, None, m, inter, cfg, a_div=k, c_padded=True,
               swiglu=True, limit=limit)

    def down_gemm(cfg):
        launch("down", act, y, row_ids, block_expert, flat_w, m, h, cfg, a_padded=True)

    key = (num_experts, inter, h, k, bucket(m), str(x.dtype))
    cands = configs(m, num_experts, block_m)
    gate_up_gemm(up_cfg or pick(f"{name}_gate_up", key, cands, gate_up_gemm))
    down_gemm(down_cfg or pick(f"{name}_down", key, cands, down_gemm))
    return _reduce(y, None, None, out, k)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, config: MoEConfig | None = None):
    """Rows offsets[e]:offsets[e+1] of x [M, K] times w[e].T ([E, N, K]) -> [M, N] in x's dtype."""
    check_float("grouped_gemm", x=x, w=w)
    if x.dim() != 2 or w.dim() != 3 or w.shape[2] != x.shape[1] or offsets.shape != (w.shape[0] + 1,):
        raise ShapeError(f"grouped_gemm: x [M, K], w [E, N, K], offsets [E+1]; got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}, {tuple(offsets.shape)}")
    m, n = x.shape[0], w.shape[1]
    out = torch.zeros((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)

    def run(cfg):
        row_ids, block_expert = align(None, counts, m, cfg.block_m)
        _launch_gemm(x, w, out, row_ids, block_expert, None, m, n, cfg)
        return out

    cands = moe_configs(m, w.shape[0])
    cfg = config or pick("grouped_gemm", (w.shape[0], n, x.shape[1], bucket(m), str(x.dtype)), cands, run)
    return run(cfg)


def unpermute(y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """out[order[i] // k] += y[i] * weights.flat[order[i]] -> [N, D] (fp32 sums, y's dtype out)."""
    n, k = weights.shape
    src = torch.empty_like(order)
    src[order] = torch.arange(order.numel(), device=order.device)  # slot -> row of y
    out = torch.empty((n, y.shape[1]), dtype=y.dtype, device=y.device)
    return _reduce(y, src, weights.reshape(-1).float().contiguous(), out, k)
