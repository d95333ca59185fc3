"""Hand schedules for the tiled grouped GEMM (lower/moe_tiles.py) on CUDA, joined in one function by a branch on
the row count M (the token copies), like the dense GEMV dispatch in schedule.py.

- decode (M <= E, about one row per expert): GEMV style. A block per (tile, 8 output columns); 32 lanes split
  the reduction over K with coalesced loads of the expert's weight row, each lane keeping the tile's rows in
  registers (rfactor), then a cross-lane reduction. Each weight element is loaded once per tile.
- otherwise: a block per (tile, 64 output columns), 16 x 16 threads (row x 4 columns each); the expert's weight
  tile [64, 16] is staged in shared memory per K step, loaded cooperatively, and read by all the tile's rows.

The fp32 tile results are rounded to the output dtype where they leave registers; the gather back to row order
is one thread per output element.
"""
from __future__ import annotations

from .deps import s_tir, tirx
from .dispatch import join
from .lower.moe_tiles import TILE_ROWS

COLS_GEMV, LANES = 8, 32
COLS_TILED, K_STEP = 64, 16


def _divisor(k: int, most: int) -> int:
    """The largest power of two <= `most` dividing K: the reduction splits need no bounds predicate (compute_at of
    the rfactor block drops it, which would let spare lanes read past a row)."""
    d = most
    while k % d:
        d //= 2
    return d


def _weight_read(sch, block) -> int:
    """Index of the [E, N, K] weight among the block's reads (x is 2-D, the tile tables 1-D)."""
    return next(i for i, r in enumerate(sch.get(block).reads) if len(r.region) == 3)


def _gather_rows(sch) -> None:
    rows = sch.get_sblock("moe_rows")
    bx, tx = sch.split(sch.fuse(*sch.get_loops(rows)), [None, 256])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def gemv(func) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    gemm = sch.get_sblock("tile_gemm")
    t, i, j, k = sch.get_loops(gemm)
    j0, j1 = sch.split(j, [None, COLS_GEMV])
    lanes = _divisor(int(sch.get(k).extent), LANES)
    k0, k1 = sch.split(k, [None, lanes])
    sch.reorder(t, j0, j1, k1, k0, i)
    rf = sch.rfactor(k1, 0)  # per-lane partial sums; `gemm` now sums the lanes, under loops of its own
    t, j0, j1, lanes, i = sch.get_loops(gemm)
    sch.reorder(i, lanes)
    sch.bind(t, "blockIdx.x")
    sch.bind(j0, "blockIdx.y")
    sch.bind(j1, "threadIdx.y")
    sch.bind(lanes, "threadIdx.x")  # the cross-lane sum
    sch.compute_at(rf, j1)
    sch.set_scope(rf, 0, "local")
    _, _, _, lane, row, step = sch.get_loops(rf)
    sch.bind(lane, "threadIdx.x")
    sch.reorder(step, row)  # one weight load per K step, used by every row of the tile
    sch.decompose_reduction(rf, step)
    sch.unroll(row)
    sch.set_scope(gemm, 0, "local")  # the lane sums stay in registers until rounded and stored
    sch.reverse_compute_at(sch.get_sblock("tile_cast"), j1)
    _gather_rows(sch)
    return sch.mod["main"]


def tiled(func) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    gemm = sch.get_sblock("tile_gemm")
    t, i, j, k = sch.get_loops(gemm)
    j0, j1, j2 = sch.split(j, [None, COLS_TILED // 4, 4])
    k0, k1 = sch.split(k, [None, _divisor(int(sch.get(k).extent), K_STEP)])
    sch.reorder(t, j0, i, j1, k0, k1, j2)
    sch.bind(t, "blockIdx.x")
    sch.bind(j0, "blockIdx.y")
    sch.bind(i, "threadIdx.y")
    sch.bind(j1, "threadIdx.x")
    w_shared = sch.cache_read(gemm, _weight_read(sch, gemm), "shared")
    sch.compute_at(w_shared, k0)
    sch.storage_align(w_shared, 0, axis=1, factor=K_STEP, offset=1)  # odd row stride: lanes on distinct banks
    copy = sch.get_loops(w_shared)[5:]  # under t, j0, i, j1, k0: the [64, K_STEP] tile of one expert's weight
    _, ty, tx = sch.split(sch.fuse(*copy), [None, TILE_ROWS, COLS_TILED // 4])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    local = sch.cache_write(gemm, 0, "local")
    sch.reverse_compute_at(local, j1)
    sch.reverse_compute_inline(sch.get_sblock("tile_cast"))
    sch.decompose_reduction(gemm, k0)
    _gather_rows(sch)
    return sch.mod["main"]


def schedule_grouped_gemm(func, num_experts: int, rows):
    """The decode and the tiled schedule of `func` in one function, branching on `rows` (M) <= num_experts."""
    return join(func, [(rows <= num_experts, gemv(func))], tiled(func))
