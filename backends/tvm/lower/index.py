"""Indexing primitives -> Relax built-ins (take, gather/scatter_elements)."""
from __future__ import annotations

from tvm import relax

from .registry import Lowered, lower


@lower("embed")
def _(ctx, node, ids, w):
    return Lowered([ctx.emit(relax.op.take(w, ids, axis=0, mode="clip"))], "relax", "relax.take")


@lower("index_select")
def _(ctx, node, x, index):
    rank = len(ctx.shape_of(x))
    out = relax.op.take(x, index, axis=node.attrs["dim"] % rank, mode="clip")
    return Lowered([ctx.emit(out)], "relax", "relax.take")


@lower("gather")
def _(ctx, node, x, index):
    rank = len(ctx.shape_of(x))
    return Lowered([ctx.emit(relax.op.gather_elements(x, index, axis=node.attrs["dim"] % rank))], "relax",
                   "relax.gather_elements")


@lower("scatter")
def _(ctx, node, x, index, src):
    rank = len(ctx.shape_of(x))
    out = relax.op.scatter_elements(x, index, src, axis=node.attrs["dim"] % rank, reduction="update")
    return Lowered([ctx.emit(out)], "relax", "relax.scatter_elements")


@lower("index_add")
def _(ctx, node, x, index, src):
    """x[index[i]] += src[i] along dim: the 1-D index broadcast over src, then scatter-add (in fp32)."""
    shape = ctx.shape_of(src)
    dim = node.attrs["dim"] % len(shape)
    view = [1] * len(shape)
    view[dim] = shape[dim]
    idx = ctx.emit(relax.op.broadcast_to(ctx.emit(relax.op.reshape(index, view)), shape))
    out = ctx.emit(relax.op.scatter_elements(ctx.f32(x), idx, ctx.f32(src), axis=dim, reduction="add"))
    return Lowered([ctx.astype(out, node.outputs[0].dtype)], "relax", "relax.scatter_elements(add)")
