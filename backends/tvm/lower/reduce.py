"""Reductions, sorting and counting -> Relax built-ins; bincount (no Relax op) is a TE reduction."""
from __future__ import annotations

from ..deps import relax, te, tirx
from .registry import TABLE, Lowered


@TABLE.register("softmax")
def _(ctx, node):
    x, = ctx.inputs(node)
    y = ctx.emit(relax.op.nn.softmax(ctx.f32(x), axis=node.attrs["dim"]))
    return Lowered("relax", "relax.nn.softmax", outputs=[ctx.astype(y, node.outputs[0].dtype)])


# dsgraph op -> (the Relax op's name under relax.op, reduce in fp32)
_REDUCE = {"sum": ("sum", False), "mean": ("mean", True), "amax": ("max", False)}


@TABLE.register(*_REDUCE)
def _(ctx, node):
    name, fp32 = _REDUCE[node.op]
    x, = ctx.inputs(node)
    rank = len(ctx.shape_of(x))
    axes = sorted({d % rank for d in node.attrs["dims"]})
    y = ctx.emit(getattr(relax.op, name)(ctx.f32(x) if fp32 else x, axes, node.attrs["keepdim"]))
    return Lowered("relax", f"relax.{name}", outputs=[ctx.astype(y, node.outputs[0].dtype)])


@TABLE.register("argmax")
def _(ctx, node):
    x, = ctx.inputs(node)
    y = ctx.emit(relax.op.argmax(x, node.attrs["dim"], node.attrs["keepdim"]))
    return Lowered("relax", "relax.argmax", outputs=[ctx.astype(y, "int64")])


@TABLE.register("topk")
def _(ctx, node):
    a = node.attrs
    x, = ctx.inputs(node)
    both = ctx.emit(relax.op.topk(x, a["k"], a["dim"], "both", a["largest"], "int64"))
    return Lowered("relax", "relax.topk",
                   outputs=[ctx.emit(relax.TupleGetItem(both, 0)), ctx.emit(relax.TupleGetItem(both, 1))])


@TABLE.register("argsort")
def _(ctx, node):
    """TVM's argsort is stable (std::stable_sort on the CPU), as the reference is."""
    a = node.attrs
    x, = ctx.inputs(node)
    out = ctx.emit(relax.op.argsort(x, a["dim"], a["descending"], "int64"))
    return Lowered("relax", "relax.argsort", outputs=[out])


@TABLE.register("cumsum")
def _(ctx, node):
    x, = ctx.inputs(node)
    return Lowered("relax", "relax.cumsum", outputs=[ctx.emit(relax.op.cumsum(x, node.attrs["dim"], ctx.dtype_of(x)))])


def bincount_te(x, length: int):
    """counts[v] = #{i : x[i] == v}; values outside 0..length-1 are not counted (the reference raises)."""
    i = te.reduce_axis((0, x.shape[0]), name="i")
    return te.compute((length,), lambda v: te.sum(tirx.Select(x[i] == v, tirx.const(1, "int64"),
                                                                tirx.const(0, "int64")), axis=i), name="bincount")


@TABLE.register("bincount")
def _(ctx, node):
    x, = ctx.inputs(node)
    return Lowered("tir", "te.bincount", outputs=[ctx.emit_te(bincount_te, x, node.attrs["length"], name="bincount")])
