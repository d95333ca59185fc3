"""Feed-forward ops -> Relax built-ins (linear, silu, split, concat)."""
from __future__ import annotations

from ..deps import relax
from .linalg import linear
from .norm import rms_norm
from .registry import TABLE, Lowered
from .shape import split_sizes


@TABLE.register("mlp.swiglu")
def _(ctx, node):
    x, g, u, d = ctx.inputs(node)
    h = ctx.emit(relax.op.multiply(ctx.emit(relax.op.nn.silu(linear(ctx, x, g, out_dtype="float32"))),
                                   linear(ctx, x, u, out_dtype="float32")))
    h = ctx.astype(h, ctx.dtype_of(x))  # the reference rounds the hidden activation to x's dtype
    return Lowered("tir", "te.nt_matmul + nn.silu + mul",
                   outputs=[linear(ctx, h, d, out_dtype=node.outputs[0].dtype)])


@TABLE.register("act.swiglu")
def _(ctx, node):
    gu, = ctx.inputs(node)
    half = int(ctx.shape_of(gu)[-1]) // 2
    g, u = split_sizes(ctx, ctx.f32(gu), (half, half), -1)
    y = ctx.emit(relax.op.multiply(ctx.emit(relax.op.nn.silu(g)), u))
    return Lowered("relax", "relax.split + nn.silu + mul", outputs=[ctx.astype(y, node.outputs[0].dtype)])


@TABLE.register("mtp.branch")
def _(ctx, node):
    h, e, en, hn, w = ctx.inputs(node)
    eps, dt = node.attrs["eps"], ctx.dtype_of(h)
    cat = ctx.emit(relax.op.concat([rms_norm(ctx, e, en, eps, dt), rms_norm(ctx, h, hn, eps, dt)], axis=-1))
    return Lowered("tir", "relax.nn.rms_norm x2 + concat + te.nt_matmul",
                   outputs=[linear(ctx, cat, w, out_dtype=node.outputs[0].dtype)])
