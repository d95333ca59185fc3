"""RMSNorm -> Relax's built-in `nn.rms_norm` (dlight has a GPU rule for it)."""
from __future__ import annotations

from ..deps import relax
from .registry import TABLE, Lowered


def rms_norm(ctx, x, w, eps: float, out_dtype: str):
    """As the reference: normalise in fp32, round to x's dtype, then scale by the weight in fp32."""
    xf = ctx.f32(x)
    if ctx.dtype_of(x) == "float32":
        return ctx.astype(ctx.emit(relax.op.nn.rms_norm(xf, ctx.f32(w), [-1], eps)), out_dtype)
    ones = ctx.emit(relax.op.ones(ctx.shape_of(w), "float32"))
    y = ctx.f32(ctx.astype(ctx.emit(relax.op.nn.rms_norm(xf, ones, [-1], eps)), ctx.dtype_of(x)))
    return ctx.astype(ctx.emit(relax.op.multiply(y, ctx.f32(w))), out_dtype)


@TABLE.register("norm.rms")
def _(ctx, node):
    x, w = ctx.inputs(node)
    return Lowered("relax", "relax.nn.rms_norm",
                   outputs=[rms_norm(ctx, x, w, node.attrs["eps"], node.outputs[0].dtype)])


@TABLE.register("norm.add_rms")
def _(ctx, node):
    x, r, w = ctx.inputs(node)
    s = ctx.astype(ctx.emit(relax.op.add(ctx.f32(x), ctx.f32(r))), ctx.dtype_of(x))
    return Lowered("relax", "relax.add + relax.nn.rms_norm",
                   outputs=[rms_norm(ctx, s, w, node.attrs["eps"], node.outputs[0].dtype), s])
