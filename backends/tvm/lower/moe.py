"""MoE experts: the grouped form (permute -> grouped GEMM -> weighted un-permute) and the per-expert form.

Relax has no grouped GEMM, so `moe.grouped_gemm` is TE over tiles of rows of one expert (moe_tiles.py): each
tile reads its expert's weights once. The per-expert form `moe.experts` is a TE gather-GEMM over (token, slot)
pairs — k expert FFNs per token, not E — reading the experts' matrices stacked [E, ...] (derived parameters,
stacked once when weights are bound).
Permute and un-permute are Relax built-ins: a stable argsort by expert and, for the way back, the
inverse permutation (argsort of the order) so no scatter is needed.
"""
from __future__ import annotations

from ..deps import relax, te, tirx
from .moe_tiles import TILE_ROWS, emit_grouped_gemm
from .reduce import bincount_te
from .registry import TABLE, Lowered


@TABLE.register("moe.grouped_gemm")
def _(ctx, node):
    x, w, offsets = ctx.inputs(node)
    out = emit_grouped_gemm(ctx, x, w, ctx.astype(offsets, "int64"), node.outputs[0].dtype)
    return Lowered("tir", f"te.moe_tiles + te.moe_grouped_gemm ({TILE_ROWS}-row tiles of one expert)",
                   outputs=[out])


@TABLE.register("moe.permute")
def _(ctx, node):
    x, indices = ctx.inputs(node)
    n, k = ctx.shape_of(indices)
    e = node.attrs["num_experts"]
    flat = ctx.emit(relax.op.reshape(indices, [n * k]))
    order = ctx.emit(relax.op.argsort(flat, 0, False, "int64"))
    tok = ctx.emit(relax.op.floor_divide(order, ctx.const(int(k), "int64")))
    x_perm = ctx.emit(relax.op.take(x, tok, axis=0, mode="clip"))
    counts = ctx.emit_te(bincount_te, flat, e, name="bincount")
    offsets = ctx.emit(relax.op.concat([ctx.const([0], "int64"), ctx.emit(relax.op.cumsum(counts, 0, "int64"))], 0))
    return Lowered("relax", "relax.argsort + take + te.bincount + cumsum", outputs=[x_perm, order, offsets])


@TABLE.register("moe.unpermute")
def _(ctx, node):
    y, weights, order = ctx.inputs(node)
    n, k = ctx.shape_of(weights)
    d = ctx.shape_of(y)[1]
    inverse = ctx.emit(relax.op.argsort(order, 0, False, "int64"))
    back = ctx.emit(relax.op.reshape(ctx.emit(relax.op.take(ctx.f32(y), inverse, axis=0, mode="clip")), [n, k, d]))
    wk = ctx.emit(relax.op.reshape(ctx.f32(weights), [n, k, 1]))
    out = ctx.emit(relax.op.sum(ctx.emit(relax.op.multiply(back, wk)), [1]))
    return Lowered("relax", "relax.argsort + take + mul + sum", outputs=[ctx.astype(out, node.outputs[0].dtype)])


def experts_te(x, weights, indices, gate, up, down, out_dtype: str):
    """out[t] = sum_j weights[t, j] * down_e(silu(gate_e x[t]) * up_e x[t]), e = indices[t, j]; fp32 inside,
    the hidden activation rounded to x's dtype as the reference does."""
    n, dm = x.shape
    kk = weights.shape[1]
    inter = gate.shape[1]
    rd = te.reduce_axis((0, dm), name="d")
    g = te.compute((n, kk, inter), lambda t, j, i: te.sum(
        x[t, rd].astype("float32") * gate[indices[t, j], i, rd].astype("float32"), axis=rd), name="gate_x")
    rd2 = te.reduce_axis((0, dm), name="d2")
    u = te.compute((n, kk, inter), lambda t, j, i: te.sum(
        x[t, rd2].astype("float32") * up[indices[t, j], i, rd2].astype("float32"), axis=rd2), name="up_x")
    h = te.compute((n, kk, inter), lambda t, j, i: (g[t, j, i] * tirx.sigmoid(g[t, j, i]) * u[t, j, i])
                   .astype(x.dtype).astype("float32"), name="hidden")
    ri = te.reduce_axis((0, inter), name="i")
    y = te.compute((n, kk, dm), lambda t, j, c: te.sum(
        h[t, j, ri] * down[indices[t, j], c, ri].astype("float32"), axis=ri), name="down_h")
    rj = te.reduce_axis((0, kk), name="j")
    out = te.compute((n, dm), lambda t, c: te.sum(y[t, rj, c] * weights[t, rj].astype("float32"), axis=rj),
                     name="experts_out")
    return out if out_dtype == "float32" else te.compute((n, dm), lambda t, c: out[t, c].astype(out_dtype),
                                                         name="experts_cast")


@TABLE.register("moe.experts")
def _(ctx, node):
    """Expert matrices that are plain parameters are stacked once at bind time; computed ones (an FP8
    checkpoint dequantised in the graph) are stacked in the graph on every call."""
    x, weights, indices, *expert_ws = ctx.inputs(node)
    e = node.attrs["num_experts"]
    params = node.inputs[3:]
    stacked, note = [], f"{e} experts' weights stacked into [E, ...] parameters at bind time"
    for role in range(3):  # gate, up, down
        vals, exprs = params[role::3], expert_ws[role::3]
        if all(v.kind == "param" for v in vals):
            shape = (e,) + tuple(int(d) for d in vals[0].shape)
            stacked.append(ctx.derived_param(f"{vals[0].name}@stacked{e}", "stack", tuple(v.name for v in vals),
                                             shape, vals[0].dtype))
        else:
            stacked.append(ctx.emit(relax.op.stack(list(exprs), axis=0)))
            note = "computed expert weights stacked in the graph on every call (relax.stack)"
    out = ctx.emit_te(experts_te, x, weights, indices, *stacked, node.outputs[0].dtype, name="moe_experts")
    return Lowered("tir", "te.moe_experts (gather-GEMM over token slots)", note, outputs=[out])
