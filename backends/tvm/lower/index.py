"""Indexing primitives -> Relax built-ins (take, gather/scatter_elements)."""
from __future__ import annotations

from ..deps import relax
from .registry import TABLE, Lowered


@TABLE.register("embed")
def _(ctx, node):
    ids, w = ctx.inputs(node)
    return Lowered("relax", "relax.take", outputs=[ctx.emit(relax.op.take(w, ids, axis=0, mode="clip"))])


@TABLE.register("index_select")
def _(ctx, node):
    x, index = ctx.inputs(node)
    rank = len(ctx.shape_of(x))
    out = relax.op.take(x, index, axis=node.attrs["dim"] % rank, mode="clip")
    return Lowered("relax", "relax.take", outputs=[ctx.emit(out)])


@TABLE.register("gather")
def _(ctx, node):
    x, index = ctx.inputs(node)
    rank = len(ctx.shape_of(x))
    out = relax.op.gather_elements(x, index, axis=node.attrs["dim"] % rank)
    return Lowered("relax", "relax.gather_elements", outputs=[ctx.emit(out)])


@TABLE.register("scatter")
def _(ctx, node):
    x, index, src = ctx.inputs(node)
    rank = len(ctx.shape_of(x))
    out = relax.op.scatter_elements(x, index, src, axis=node.attrs["dim"] % rank, reduction="update")
    return Lowered("relax", "relax.scatter_elements", outputs=[ctx.emit(out)])


@TABLE.register("index_add")
def _(ctx, node):
    """x[index[i]] += src[i] along dim: the 1-D index broadcast over src, then scatter-add (in fp32)."""
    x, index, src = ctx.inputs(node)
    shape = ctx.shape_of(src)
    dim = node.attrs["dim"] % len(shape)
    view = [1] * len(shape)
    view[dim] = shape[dim]
    idx = ctx.emit(relax.op.broadcast_to(ctx.emit(relax.op.reshape(index, view)), shape))
    out = ctx.emit(relax.op.scatter_elements(ctx.f32(x), idx, ctx.f32(src), axis=dim, reduction="add"))
    return Lowered("relax", "relax.scatter_elements(add)", outputs=[ctx.astype(out, node.outputs[0].dtype)])
