"""Hand CUDA schedule for the split-KV absorbed MLA (lower/mla_split.py): two kernels.

1. Chunks: a thread block per (batch, query, cache chunk of CHUNK rows), up to 16 heads at once (more heads
   loop). Threads (head, lane of 32): the head's scores over the chunk's rows (CHUNK / 32 rows per lane, the
   576-wide dot serial in a register, rows read through L1) into shared memory, the chunk max and exp-sum by
   cross-lane reductions, the exp weights in shared memory, then the chunk's latent-weighted sum with lanes
   over the C output channels. The chunk partials go through global memory (B*S*H*(T/CHUNK)*C fp32: about a
   fifth of the cache's bytes at CHUNK = 128).
2. Reduce: a block per (batch, query, head), a thread per 4 output channels; each thread rescales the chunks by
   exp(chunk max - max) and divides by the rescaled sum (the online-softmax reduce).

No tensor cores: the dots run on CUDA cores in fp32.
"""
from __future__ import annotations

from .deps import s_tir, tirx
from .schedule_moe import _divisor

HEADS = 16      # heads per block in the chunk kernel
LANES = 32
REDUCE_THREADS = 128


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _under(sch, block, anchor) -> list:
    """The block's loops inside `anchor` (one of its enclosing loops); a unit head loop may be absent."""
    loops = sch.get_loops(block)
    at = next(n for n, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(anchor)))
    return loops[at + 1:]


def _bind_heads_lanes(sch, head_and_rows: list) -> None:
    """Heads on threadIdx.y; the chunk's rows (or output channels) split over LANES lanes, the rest serial."""
    *head, rows = head_and_rows
    if head:
        sch.bind(head[0], "threadIdx.y")
    _, lane = sch.split(rows, [None, LANES])
    sch.bind(lane, "threadIdx.x")


def _chunks(sch) -> None:
    """Anchored at the scores (the first stage): every later stage follows them into the block, in order."""
    g = sch.get_sblock
    sch.compute_inline(g("mla_score"))
    qk = g("mla_qk")
    b, i, hh, p, jj, _ = sch.get_loops(qk)
    heads = _extent(sch, hh)
    h0, h1 = sch.split(hh, [None, heads if heads <= HEADS else _divisor(heads, HEADS)])
    sch.reorder(b, i, p, h0, h1, jj)
    sch.bind(sch.fuse(b, i, p), "blockIdx.x")
    sch.bind(h1, "threadIdx.y")
    rows, lane = sch.split(jj, [None, LANES])
    sch.bind(lane, "threadIdx.x")
    sch.set_scope(qk, 0, "shared")
    sch.reverse_compute_at(sch.cache_write(qk, 0, "local"), lane)  # the dot accumulates in a register
    for name in ("mla_chunk_max", "mla_p", "mla_chunk_sum", "mla_chunk_out"):
        sch.reverse_compute_at(g(name), h0)
    sch.set_scope(g("mla_p"), 0, "shared")
    for name in ("mla_chunk_max", "mla_p", "mla_chunk_sum"):  # max and sum: a cross-lane reduction
        _bind_heads_lanes(sch, _under(sch, g(name), h0))
    out = g("mla_chunk_out")
    *head, cc, _ = _under(sch, out, h0)
    c0, c1 = sch.split(cc, [None, LANES])
    sch.reorder(c1, c0)
    if head:
        sch.bind(head[0], "threadIdx.y")
    sch.bind(c1, "threadIdx.x")
    sch.reverse_compute_at(sch.cache_write(out, 0, "local"), c1)


def _reduce(sch) -> None:
    g = sch.get_sblock
    out = g("mla_out")
    b, i, hh, cc = sch.get_loops(out)
    c0, c1 = sch.split(cc, [None, REDUCE_THREADS])
    sch.reorder(b, i, hh, c1, c0)
    sch.bind(sch.fuse(b, i, hh), "blockIdx.x")
    sch.bind(c1, "threadIdx.x")
    for name in ("mla_num", "mla_den", "mla_max"):
        sch.compute_at(g(name), c1)
        sch.set_scope(g(name), 0, "local")


def schedule_mla_split(func) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    _chunks(sch)
    _reduce(sch)
    return sch.mod["main"]
