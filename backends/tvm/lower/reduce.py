"""Reductions, sorting and counting -> Relax built-ins; bincount (no Relax op) is a TE reduction."""
from __future__ import annotations

from tvm import relax, te, tirx

from .registry import Lowered, lower


@lower("softmax")
def _(ctx, node, x):
    y = ctx.emit(relax.op.nn.softmax(ctx.f32(x), axis=node.attrs["dim"]))
    return Lowered([ctx.astype(y, node.outputs[0].dtype)], "relax", "relax.nn.softmax")


def _reduce(op, fn, fp32):
    @lower(op)
    def _(ctx, node, x):
        rank = len(ctx.shape_of(x))
        axes = sorted({d % rank for d in node.attrs["dims"]})
        y = ctx.emit(fn(ctx.f32(x) if fp32 else x, axes, node.attrs["keepdim"]))
        return Lowered([ctx.astype(y, node.outputs[0].dtype)], "relax", f"relax.{fn.__name__}")


_reduce("sum", relax.op.sum, False)
_reduce("mean", relax.op.mean, True)
_reduce("amax", relax.op.max, False)


@lower("argmax")
def _(ctx, node, x):
    y = ctx.emit(relax.op.argmax(x, node.attrs["dim"], node.attrs["keepdim"]))
    return Lowered([ctx.astype(y, "int64")], "relax", "relax.argmax")


@lower("topk")
def _(ctx, node, x):
    a = node.attrs
    both = ctx.emit(relax.op.topk(x, a["k"], a["dim"], "both", a["largest"], "int64"))
    return Lowered([ctx.emit(relax.TupleGetItem(both, 0)), ctx.emit(relax.TupleGetItem(both, 1))], "relax",
                   "relax.topk")


@lower("argsort")
def _(ctx, node, x):
    """TVM's argsort is stable (std::stable_sort on the CPU), as the reference is."""
    a = node.attrs
    return Lowered([ctx.emit(relax.op.argsort(x, a["dim"], a["descending"], "int64"))], "relax", "relax.argsort")


@lower("cumsum")
def _(ctx, node, x):
    return Lowered([ctx.emit(relax.op.cumsum(x, node.attrs["dim"], ctx.dtype_of(x)))], "relax", "relax.cumsum")


def bincount_te(x, length: int):
    """counts[v] = #{i : x[i] == v}; values outside 0..length-1 are not counted (the reference raises)."""
    i = te.reduce_axis((0, x.shape[0]), name="i")
    return te.compute((length,), lambda v: te.sum(tirx.Select(x[i] == v, tirx.const(1, "int64"),
                                                                tirx.const(0, "int64")), axis=i), name="bincount")


@lower("bincount")
def _(ctx, node, x):
    return Lowered([ctx.emit_te(bincount_te, x, node.attrs["length"], name="bincount")], "tir", "te.bincount")
