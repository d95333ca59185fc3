"""DeepSeek Sparse Attention (V3.2): LayerNorm -> Relax's `nn.layer_norm`; the indexer's scores and sparse absorbed
MLA -> TE functions written here; the top-k -> Relax's stable argsort (ties to the lower position, as the op
defines) over the logits padded with -inf to at least k columns. Naive `attention.mla_sparse` is legalized (the tvm
pipeline absorbs it first)."""
from __future__ import annotations

from dsgraph.backends.lowering import Decline

from ..deps import relax, te, tirx
from .registry import TABLE, Lowered

NEG_INF = float("-inf")


@TABLE.register("norm.layer")
def _(ctx, node):
    x, w, b = ctx.inputs(node)
    out = ctx.emit(relax.op.nn.layer_norm(ctx.f32(x), ctx.f32(w), ctx.f32(b), [-1], node.attrs["eps"]))
    return Lowered("relax", "relax.nn.layer_norm", outputs=[ctx.astype(out, node.outputs[0].dtype)])


def indexer_logits_te(q, k, w, scale: float, causal: bool):
    """q [B,S,H,D], k [B,T,D], w [B,S,H] -> fp32 [B,S,T] = sum_h w * relu(q_h . k) * scale, -inf past the horizon."""
    bsz, s, h, d = q.shape
    t = k.shape[1]
    r = te.reduce_axis((0, d), name="r")
    dot = te.compute((bsz, s, h, t), lambda b, i, hh, j: te.sum(
        q[b, i, hh, r].astype("float32") * k[b, j, r].astype("float32"), axis=r), name="qk")
    n = te.reduce_axis((0, h), name="n")
    total = te.compute((bsz, s, t), lambda b, i, j: te.sum(
        w[b, i, n].astype("float32") * tirx.max(dot[b, i, n, j], tirx.const(0.0, "float32")), axis=n), name="score")
    if not causal:
        return te.compute(total.shape, lambda b, i, j: total[b, i, j] * scale, name="logits")
    return te.compute(total.shape, lambda b, i, j: tirx.Select(
        j <= i + (t - s), total[b, i, j] * scale, tirx.const(NEG_INF, "float32")), name="logits")


@TABLE.register("indexer.logits")
def _(ctx, node):
    if node.attrs["fp8"]:
        return Decline("fp8=True (DeepSeek's Hadamard + e4m3 indexer numerics): the tvm backend casts to no FP8 "
                       "format; compile the default fp8=False graph")
    out = ctx.emit_te(indexer_logits_te, *ctx.inputs(node), node.attrs["scale"], node.attrs["causal"],
                      name="indexer_logits")
    return Lowered("tir", "te.indexer_logits (weighted ReLU over heads)", outputs=[out])


def _pad_te(logits, k: int):
    """[B,S,T] -> [B,S,T+k] with -inf after T: at least k columns, the empty ones last."""
    bsz, s, t = logits.shape
    return te.compute((bsz, s, t + k), lambda b, i, j: tirx.Select(
        j < t, logits[b, i, tirx.min(j, t - 1)], tirx.const(NEG_INF, "float32")), name="padded")


@TABLE.register("indexer.topk")
def _(ctx, node):
    (logits,) = ctx.inputs(node)
    k = node.attrs["k"]
    padded = ctx.emit_te(_pad_te, ctx.f32(logits), k, name="indexer_topk_pad")
    order = ctx.emit(relax.op.argsort(padded, 2, True, "int64"))
    top = ctx.emit(relax.op.strided_slice(order, axes=[2], begin=[0], end=[k], assume_inbound=True))  # T + k >= k
    empty = ctx.emit(relax.op.equal(ctx.emit(relax.op.gather_elements(padded, top, axis=2)), ctx.const(NEG_INF)))
    out = ctx.emit(relax.op.where(empty, ctx.const(-1, "int64"), top))
    return Lowered("relax", "relax.argsort (stable) over -inf-padded logits + where(-1)", outputs=[out])


def sparse_mla_te(q, cache, idx, scale: float, causal: bool, c: int, out_dtype: str):
    """q [B,S,H,C+R], cache [B,T,C+R], idx [B,S,K] -> [B,S,H,C]: each query over its selected rows, fp32."""
    bsz, s, h, width = q.shape
    t, n = cache.shape[1], idx.shape[2]

    def ok(b, i, j):
        sel = idx[b, i, j].astype("int64")
        keep = tirx.all(sel >= 0, sel < t)
        return tirx.all(keep, sel <= i + (t - s)) if causal else keep

    def row(b, i, j):
        return tirx.max(idx[b, i, j].astype("int64"), tirx.const(0, "int64"))

    r = te.reduce_axis((0, width), name="r")
    dot = te.compute((bsz, s, h, n), lambda b, i, hh, j: te.sum(
        q[b, i, hh, r].astype("float32") * cache[b, row(b, i, j), r].astype("float32"), axis=r), name="qk")
    score = te.compute(dot.shape, lambda b, i, hh, j: tirx.Select(
        ok(b, i, j), dot[b, i, hh, j] * scale, tirx.const(NEG_INF, "float32")), name="score")
    j1, j2, j3 = (te.reduce_axis((0, n), name=f"j{x}") for x in range(3))
    mx = te.compute((bsz, s, h), lambda b, i, hh: te.max(score[b, i, hh, j1], axis=j1), name="row_max")
    p = te.compute(score.shape, lambda b, i, hh, j: tirx.exp(score[b, i, hh, j] - mx[b, i, hh]), name="p")
    den = te.compute((bsz, s, h), lambda b, i, hh: te.sum(p[b, i, hh, j2], axis=j2), name="row_sum")
    num = te.compute((bsz, s, h, c), lambda b, i, hh, cc: te.sum(
        p[b, i, hh, j3] * cache[b, row(b, i, j3), cc].astype("float32"), axis=j3), name="pv")
    return te.compute((bsz, s, h, c), lambda b, i, hh, cc: (num[b, i, hh, cc] / den[b, i, hh]).astype(out_dtype),
                      name="sparse_mla_out")


@TABLE.register("attention.mla_sparse_absorbed")
def _(ctx, node):
    a = node.attrs
    out = ctx.emit_te(sparse_mla_te, *ctx.inputs(node), a["scale"], a["causal"], a["kv_lora_rank"],
                      node.outputs[0].dtype, name="mla_sparse_absorbed")
    return Lowered("tir", "te.mla_sparse_absorbed (gathers the selected latent rows)", outputs=[out])
