"""GEMMs -> Relax built-ins. References compute in fp32 and round to the declared dtype; fp32 graphs
use the ops as they are, other dtypes accumulate in fp32 (`out_dtype`) and cast back."""
from __future__ import annotations

from ..deps import relax
from .registry import TABLE, Lowered


def linear(ctx, x, w, bias=None, out_dtype: str | None = None):
    """x @ w.T (+ bias) accumulated in fp32, cast to `out_dtype` (default: x's dtype)."""
    out_dtype = out_dtype or ctx.dtype_of(x)
    if ctx.dtype_of(x) == "float32" and ctx.dtype_of(w) == "float32":
        y = ctx.emit(relax.op.linear(x, w, None if bias is None else ctx.f32(bias)))
    else:
        y = ctx.emit(relax.op.matmul(x, ctx.emit(relax.op.permute_dims(w)), out_dtype="float32"))
        if bias is not None:
            y = ctx.emit(relax.op.add(y, ctx.f32(bias)))
    return ctx.astype(y, out_dtype)


@TABLE.register("linear")
def _(ctx, node):
    return Lowered("relax", "relax.linear", outputs=[linear(ctx, *ctx.inputs(node), out_dtype=node.outputs[0].dtype)])


@TABLE.register("matmul")
def _(ctx, node):
    y = ctx.emit(relax.op.matmul(*ctx.inputs(node), out_dtype="float32"))
    return Lowered("relax", "relax.matmul", outputs=[ctx.astype(y, node.outputs[0].dtype)])


@TABLE.register("einsum")
def _(ctx, node):
    y = ctx.emit(relax.op.einsum([ctx.f32(v) for v in ctx.inputs(node)], node.attrs["equation"].replace(" ", "")))
    return Lowered("relax", "relax.einsum", outputs=[ctx.astype(y, node.outputs[0].dtype)])


@TABLE.register("conv2d")
def _(ctx, node):
    """relax.nn.conv2d in fp32 (NCHW / OIHW), + bias per output channel, cast to the declared dtype."""
    x, w, *bias = ctx.inputs(node)
    s, p = node.attrs["stride"], node.attrs["padding"]
    y = ctx.emit(relax.op.nn.conv2d(ctx.f32(x), ctx.f32(w), strides=(s, s), padding=(p, p, p, p),
                                    out_dtype="float32"))
    if bias:
        y = ctx.emit(relax.op.add(y, ctx.emit(relax.op.reshape(ctx.f32(bias[0]), [1, -1, 1, 1]))))
    return Lowered("relax", "relax.nn.conv2d", outputs=[ctx.astype(y, node.outputs[0].dtype)])
