"""The grouped GEMM of expert-sorted tokens (`moe.grouped_gemm`) as TE written for tiles of rows.

`moe.permute` sorts the token copies by expert (expert e owns rows offsets[e]:offsets[e+1]). Each expert's rows
are cut into tiles of TILE_ROWS; a tile belongs to one expert, so the GEMM over a tile reads that expert's
weights once for all its rows (the old per-row form read them once per row). Two TE functions:

  moe_tiles(offsets)  -> tile_expert [Tmax], tile_row0 [Tmax], tile_end [Tmax], row_slot [M]
  moe_grouped_gemm(x, w, tables...) -> tile_gemm [Tmax, TILE_ROWS, N] (fp32), then each row gathered back

Tmax = min(M, ceil(M / TILE_ROWS) + E) bounds the number of tiles (each expert adds at most one partial tile,
each tile holds a row); tiles past the last are empty (tile_expert = E, no valid row). Rows outside a tile's
expert read zeros (a clamped, masked load), so every load is in bounds. On CUDA the GEMM function is scheduled
by hand (schedule_moe.py); on llvm it runs as written.
"""
from __future__ import annotations

from ..deps import relax, te, tirx

TILE_ROWS = 16
KERNEL_ATTR = "dsgraph.kernel"
GROUPED_GEMM = "moe_grouped_gemm"


def _i64(v):
    return tirx.const(v, "int64")


def tiles_te(offsets, m):
    """offsets [E+1] (int64), m = number of rows -> (tile_expert, tile_row0, tile_end [Tmax], row_slot [M])."""
    e = int(offsets.shape[0]) - 1
    bm = _i64(TILE_ROWS)
    count = te.compute((e,), lambda j: (offsets[j + 1] - offsets[j] + bm - 1) // bm, name="tiles_per_expert")
    r = te.reduce_axis((0, e), name="r")
    first = te.compute((e,), lambda j: te.sum(tirx.Select(r < j, count[r], _i64(0)), axis=r), name="first_tile")
    t_max = tirx.min(m, (m + TILE_ROWS - 1) // TILE_ROWS + e)  # every tile holds at least one row
    r2 = te.reduce_axis((0, e), name="r2")
    owner = te.compute((t_max,), lambda t: te.sum(tirx.Select(first[r2] + count[r2] <= t, _i64(1), _i64(0)), axis=r2),
                       name="tile_expert")

    def row0(t):
        j = tirx.min(owner[t], _i64(e - 1))
        return tirx.Select(owner[t] < e, offsets[j] + (t - first[j]) * bm, offsets[e])

    start = te.compute((t_max,), row0, name="tile_row0")
    end = te.compute((t_max,), lambda t: tirx.Select(owner[t] < e, tirx.min(start[t] + bm, offsets[tirx.min(
        owner[t], _i64(e - 1)) + 1]), offsets[e]), name="tile_end")
    r3 = te.reduce_axis((0, e), name="r3")
    row_expert = te.compute((m,), lambda i: te.sum(tirx.Select(offsets[r3 + 1] <= i, _i64(1), _i64(0)), axis=r3),
                            name="row_expert")
    slot = te.compute((m,), lambda i: (first[row_expert[i]] + (i - offsets[row_expert[i]]) // bm) * bm
                      + (i - offsets[row_expert[i]]) % bm, name="row_slot")
    return owner, start, end, slot


def grouped_gemm_te(x, w, tile_expert, tile_row0, tile_end, row_slot, out_dtype: str):
    """x [M, K] sorted by expert, w [E, N, K] -> [M, N]: per tile, its rows times its expert's w.T (fp32)."""
    m, k = x.shape
    e, n = int(w.shape[0]), w.shape[1]
    t_max = tile_expert.shape[0]
    rk = te.reduce_axis((0, k), name="k")

    def a(t, i, kk):
        row = tile_row0[t] + i
        return tirx.Select(row < tile_end[t], x[tirx.min(row, m - 1), kk].astype("float32"),
                           tirx.const(0.0, "float32"))

    def b(t, j, kk):  # an empty tile (past the last) loads no weights
        return tirx.Select(tile_expert[t] < e, w[tirx.min(tile_expert[t], _i64(e - 1)), j, kk].astype("float32"),
                           tirx.const(0.0, "float32"))

    acc = te.compute((t_max, TILE_ROWS, n), lambda t, i, j: te.sum(a(t, i, rk) * b(t, j, rk), axis=rk),
                     name="tile_gemm")
    tiles = te.compute((t_max, TILE_ROWS, n), lambda t, i, j: acc[t, i, j].astype(out_dtype), name="tile_cast")
    return te.compute((m, n), lambda i, j: tiles[row_slot[i] // TILE_ROWS, row_slot[i] % TILE_ROWS, j],
                      name="moe_rows")


def emit_grouped_gemm(ctx, x, w, offsets, out_dtype: str):
    """The two TE functions; the GEMM is tagged for the CUDA schedule step and kept out of operator fusion."""
    m = ctx.shape_of(x)[0]
    tables = ctx.emit_te(lambda off: tiles_te(off, m), offsets, name="moe_tiles")
    parts = [ctx.emit(relax.TupleGetItem(tables, i)) for i in range(4)]
    return ctx.emit_te(grouped_gemm_te, x, w, *parts, out_dtype, name=GROUPED_GEMM,
                       primfunc_attrs={KERNEL_ATTR: GROUPED_GEMM, "op_pattern": 8})
