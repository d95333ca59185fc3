"""Collective ops: what a sharded graph exchanges between the ranks of a process group.

    dist.all_reduce(x)                        sum over the group; every rank gets the sum
    dist.all_gather(x, dim)                   every rank's x concatenated along dim (rank order)
    dist.reduce_scatter(x, dim)               the sum, cut into group_size pieces along dim; rank r keeps piece r
    dist.all_to_all(x, send_counts, rows)     rank r sends rows send_counts[s] of x (in order) to rank s and
                                              receives `rows` rows (a fresh symbol when data-dependent) plus
                                              the counts it got from each rank (MoE dispatch / combine)

Type rules are in terms of `group_size`, which also names the group: the world cut into contiguous blocks of
`group_size` ranks, a rank's group is its block (ranks r // G * G .. + G; G = the world is the default group).
Tensor parallelism inside expert parallelism (tp=2 in ep=4) runs its collectives on blocks of tp ranks, the
MoE's on the world. Each op has two semantics, declared once here:
  - `reference` (one process): torch.distributed on this rank's group (`process_group`; the default group when
    group_size is the world) when one is initialised (the eager backend runs it, so `torchrun` needs no other
    lowering), the identity when group_size is 1 outside a one-rank process group;
  - `SIMULATE[name]` (all ranks of one group at once): a function of the group's inputs giving its outputs, which
    `dsgraph.multirank.MultiRankInterpreter` uses to run all ranks' graphs in one process.
Collectives are neither primitives nor domain ops (level "collective"): legalization leaves them alone and a
backend lowers them to its communication library.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as tdist

from ..errors import DSGraphError
from ..symbolic import parse_dim
from ..types import TensorType
from .common import expect_int, f32, norm_dim
from .registry import Attr, defop, expect

LEVEL = "collective"
GROUP = {"group_size": Attr(int)}
SIMULATE: dict[str, Callable[[list[list[torch.Tensor]], dict], list[list[torch.Tensor]]]] = {}


_SUBGROUPS: dict[int, object] = {}  # group_size -> this rank's torch.distributed subgroup


def process_group(group_size: int):
    """This rank's group of `group_size` ranks: None (the default group) for the whole world, else its contiguous
    block, created for every block the first time (`torch.distributed.new_subgroups`, a collective call: every
    rank asks for the same sizes in the same order, as SPMD graphs do; `runtime.distributed.init_groups` asks
    up front, outside any CUDA-graph capture)."""
    joined = tdist.is_available() and tdist.is_initialized()
    world = tdist.get_world_size() if joined else 1
    if world == group_size:
        return None
    if world == 1 or world % group_size:
        how = ("initialise a process group (torchrun; dsgraph.runtime.distributed.init)" if not joined
               else f"the process group has {world} rank(s), which {group_size}-rank blocks do not tile")
        raise DSGraphError(f"collective over {group_size} ranks cannot run here: {how}, or run every rank's "
                           "graph in one process with dsgraph.multirank.MultiRankInterpreter")
    if group_size not in _SUBGROUPS:
        _SUBGROUPS[group_size] = tdist.new_subgroups(group_size=group_size)[0]
    return _SUBGROUPS[group_size]


def forget_groups() -> None:
    """Drop the subgroups (the process group they belong to is being destroyed)."""
    _SUBGROUPS.clear()


def _group(group_size: int):
    """(process group, or None for the default one; whether to communicate) a one-process reference runs over:
    alone (no process group, or a group of 1 inside a larger world) it is the identity; in a process group of
    one rank (torchrun --nproc-per-node 1) the collective still goes through it (NCCL's path, capturable)."""
    world = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 0
    if group_size == 1 and world != 1:
        return None, False
    return process_group(group_size), True


def _expect_group(group_size: int) -> None:
    expect(group_size >= 1, f"collective group_size must be >= 1, got {group_size}")


# ---------------------------------------------------------------- all_reduce
ALL_REDUCE = defop("dist.all_reduce", "x", dict(GROUP), "Sum of x over the group, on every rank.", level=LEVEL)


@ALL_REDUCE.infer
def _(x, group_size):
    _expect_group(group_size)
    return x


@ALL_REDUCE.reference
def _(x, group_size):
    pg, talk = _group(group_size)
    if not talk:
        return x.clone()
    out = x.contiguous().clone()
    tdist.all_reduce(out, group=pg)
    return out


def _sum(xs: list[torch.Tensor]) -> torch.Tensor:
    """Rank-ordered fp32 sum (what a ring all-reduce computes up to summation order)."""
    acc = f32(xs[0]).clone()
    for x in xs[1:]:
        acc += f32(x)
    return acc.to(xs[0].dtype)


SIMULATE["dist.all_reduce"] = lambda args, attrs: [[_sum([a[0] for a in args])] for _ in args]

# ---------------------------------------------------------------- all_gather
ALL_GATHER = defop("dist.all_gather", "x", {**GROUP, "dim": Attr(int)},
                   "Every rank's x concatenated along dim in rank order, on every rank.", level=LEVEL)


@ALL_GATHER.infer
def _(x, group_size, dim):
    _expect_group(group_size)
    d = norm_dim(dim, x.rank)
    return TensorType(x.shape[:d] + (x.shape[d] * group_size,) + x.shape[d + 1:], x.dtype)


@ALL_GATHER.reference
def _(x, group_size, dim):
    pg, talk = _group(group_size)
    if not talk:
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(group_size)]
    tdist.all_gather(parts, x.contiguous(), group=pg)
    return torch.cat(parts, dim=dim)


SIMULATE["dist.all_gather"] = lambda args, attrs: [[torch.cat([a[0] for a in args], dim=attrs["dim"])]
                                                   for _ in args]

# ---------------------------------------------------------------- reduce_scatter
REDUCE_SCATTER = defop("dist.reduce_scatter", "x", {**GROUP, "dim": Attr(int)},
                       "The sum over the group cut into group_size equal pieces along dim; rank r keeps piece r.",
                       level=LEVEL)


@REDUCE_SCATTER.infer
def _(x, group_size, dim):
    _expect_group(group_size)
    d = norm_dim(dim, x.rank)
    n = x.shape[d]
    expect(isinstance(n, int) and n % group_size == 0,
           f"dist.reduce_scatter: dim {d} of {x} does not split into {group_size} equal pieces")
    return TensorType(x.shape[:d] + (n // group_size,) + x.shape[d + 1:], x.dtype)


@REDUCE_SCATTER.reference
def _(x, group_size, dim):
    """NCCL has the collective; gloo has none, so there it is an all-reduce keeping this rank's piece."""
    pg, talk = _group(group_size)
    if not talk:
        return x.clone()
    rank = tdist.get_rank(pg)
    if tdist.get_backend(pg) == "nccl" and dim % x.dim() == 0:
        out = x.new_empty((x.shape[0] // group_size,) + tuple(x.shape[1:]))
        tdist.reduce_scatter_tensor(out, x.contiguous(), group=pg)
        return out
    full = x.contiguous().clone()
    tdist.all_reduce(full, group=pg)
    return full.chunk(group_size, dim=dim)[rank].contiguous()


SIMULATE["dist.reduce_scatter"] = lambda args, attrs: [
    [_sum([a[0] for a in args]).chunk(attrs["group_size"], dim=attrs["dim"])[r].contiguous()]
    for r in range(len(args))]

# ---------------------------------------------------------------- all_to_all
ALL_TO_ALL = defop("dist.all_to_all", "x send_counts", {**GROUP, "rows": Attr((int, str))},
                   "Rows of x [N, ...] grouped by destination rank (send_counts [G] int64, summing to N) go to "
                   "their ranks; out [rows, ...] holds the rows received, by source rank, and recv_counts [G]. "
                   "`rows` is the received row count: a known dim, or a fresh symbol when it depends on the data.",
                   num_outputs=2, level=LEVEL)


@ALL_TO_ALL.infer
def _(x, send_counts, group_size, rows):
    _expect_group(group_size)
    expect(x.rank >= 1, f"dist.all_to_all: x must have a row dim, got {x}")
    expect_int(send_counts, "dist.all_to_all send_counts")
    expect(send_counts.shape == (group_size,),
           f"dist.all_to_all: send_counts must be [{group_size}] (one count per rank), got {send_counts}")
    return TensorType((parse_dim(rows),) + x.shape[1:], x.dtype), TensorType((group_size,), send_counts.dtype)


@ALL_TO_ALL.reference
def _(x, send_counts, group_size, rows):
    pg, talk = _group(group_size)
    if not talk:
        return x.clone(), send_counts.clone()
    recv = torch.empty_like(send_counts)
    tdist.all_to_all_single(recv, send_counts.contiguous(), group=pg)
    out = x.new_empty((int(recv.sum()),) + tuple(x.shape[1:]))
    tdist.all_to_all_single(out, x.contiguous(), recv.tolist(), send_counts.tolist(), group=pg)
    return out, recv


def _all_to_all(args, attrs):
    pieces = [list(torch.split(x, counts.tolist(), dim=0)) for x, counts in args]
    return [[torch.cat([pieces[s][r] for s in range(len(args))], dim=0),
             torch.stack([args[s][1][r] for s in range(len(args))])] for r in range(len(args))]


SIMULATE["dist.all_to_all"] = _all_to_all
COLLECTIVES = tuple(SIMULATE)
