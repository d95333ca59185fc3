"""GEMMs -> Relax built-ins. References compute in fp32 and round to the declared dtype; fp32 graphs
use the ops as they are, other dtypes accumulate in fp32 (`out_dtype`) and cast back."""
from __future__ import annotations

from tvm import relax

from .registry import Lowered, lower


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


@lower("linear")
def _(ctx, node, x, w, b=None):
    return Lowered([linear(ctx, x, w, b, node.outputs[0].dtype)], "relax", "relax.linear")


@lower("matmul")
def _(ctx, node, a, b):
    y = ctx.emit(relax.op.matmul(a, b, out_dtype="float32"))
    return Lowered([ctx.astype(y, node.outputs[0].dtype)], "relax", "relax.matmul")


@lower("einsum")
def _(ctx, node, a, b):
    y = ctx.emit(relax.op.einsum([ctx.f32(a), ctx.f32(b)], node.attrs["equation"].replace(" ", "")))
    return Lowered([ctx.astype(y, node.outputs[0].dtype)], "relax", "relax.einsum")
