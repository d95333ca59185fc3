"""Shape and data-movement primitives -> Relax built-ins, plus two tiny TE index generators
(arange over a symbolic length, the causal mask) that Relax would need several ops for."""
from __future__ import annotations

from ..deps import relax, te
from .registry import TABLE, Lowered


@TABLE.register("reshape")
def _(ctx, node):
    x, = ctx.inputs(node)
    return Lowered("relax", "relax.reshape", outputs=[ctx.emit(relax.op.reshape(x, ctx.dims(node.attrs["shape"])))])


@TABLE.register("permute")
def _(ctx, node):
    x, = ctx.inputs(node)
    return Lowered("relax", "relax.permute_dims",
                   outputs=[ctx.emit(relax.op.permute_dims(x, list(node.attrs["dims"])))])


@TABLE.register("expand")
def _(ctx, node):
    x, = ctx.inputs(node)
    return Lowered("relax", "relax.broadcast_to",
                   outputs=[ctx.emit(relax.op.broadcast_to(x, ctx.dims(node.attrs["shape"])))])


def split_sizes(ctx, x, sizes, dim):
    """relax.split by sizes: Relax takes the split points, so accumulate them."""
    rank = len(ctx.shape_of(x))
    points, acc = [], 0
    for s in sizes[:-1]:
        acc = acc + ctx.dim(s)
        points.append(acc)
    if not points:
        return [x]
    parts = ctx.emit(relax.op.split(x, points, axis=dim % rank))
    return [ctx.emit(relax.TupleGetItem(parts, i)) for i in range(len(sizes))]


@TABLE.register("split")
def _(ctx, node):
    x, = ctx.inputs(node)
    return Lowered("relax", "relax.split", outputs=split_sizes(ctx, x, node.attrs["sizes"], node.attrs["dim"]))


def slice_dim(ctx, x, dim, start, end):
    shape = ctx.shape_of(x)
    dim %= len(shape)
    size = shape[dim]
    if start < 0 and end is None:
        begin, stop = size + start, size
    else:
        begin, stop = start, size if end is None else end
    return ctx.emit(relax.op.strided_slice(x, axes=[dim], begin=[begin], end=[stop], assume_inbound=True))


@TABLE.register("slice")
def _(ctx, node):
    a = node.attrs
    x, = ctx.inputs(node)
    return Lowered("relax", "relax.strided_slice", outputs=[slice_dim(ctx, x, a["dim"], a["start"], a["end"])])


@TABLE.register("concat")
def _(ctx, node):
    xs = ctx.inputs(node)
    rank = len(ctx.shape_of(xs[0]))
    return Lowered("relax", "relax.concat", outputs=[ctx.emit(relax.op.concat(xs, axis=node.attrs["dim"] % rank))])


@TABLE.register("cache.append")
def _(ctx, node):
    return Lowered("relax", "relax.concat", "functional cache update (new cache tensor each step)",
                   outputs=[ctx.emit(relax.op.concat(ctx.inputs(node), axis=1))])


@TABLE.register("arange_like")
def _(ctx, node):
    x, = ctx.inputs(node)
    n = ctx.shape_of(x)[node.attrs["dim"] % len(ctx.shape_of(x))]
    out = ctx.emit_te(lambda: te.compute((n,), lambda i: i.astype("int64"), name="arange"), name="arange")
    return Lowered("tir", "te.arange", outputs=[out])


def causal_mask_te(sq, sk):
    """bool [Sq, Sk]: query i sits at absolute position Sk - Sq + i and sees keys 0..Sk - Sq + i."""
    return te.compute((sq, sk), lambda i, j: j <= i + (sk - sq), name="causal_mask")


@TABLE.register("causal_mask")
def _(ctx, node):
    a = node.attrs
    q, k = ctx.inputs(node)
    sq = ctx.shape_of(q)[a["q_dim"] % len(ctx.shape_of(q))]
    sk = ctx.shape_of(k)[a["k_dim"] % len(ctx.shape_of(k))]
    return Lowered("tir", "te.causal_mask", outputs=[ctx.emit_te(lambda: causal_mask_te(sq, sk), name="causal_mask")])

