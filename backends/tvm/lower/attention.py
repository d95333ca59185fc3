"""Attention and the MLA projections.

GQA and naive MLA are Relax built-ins (batched matmul, causal mask, softmax, matmul, in fp32), the
query heads of one kv head viewed as [B, Hkv, g, S, D] so K and V are never repeated. Absorbed MLA —
every head attending to the one shared latent cache [B, T, C+R], values being its first C dims — has no
Relax op: it is split-KV TE (mla_split.py).
"""
from __future__ import annotations

from ..deps import relax
from .linalg import linear
from .mla_split import CHUNK, KERNEL, mla_split_te
from .moe_tiles import KERNEL_ATTR
from .norm import rms_norm
from .registry import TABLE, Lowered
from .shape import causal_mask_te, split_sizes


def attention(ctx, q, k, v, scale: float, causal: bool, out_dtype: str):
    """q [B,S,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv] -> [B,S,Hq,Dv]; fp32 inside."""
    b, s, hq, dq = ctx.shape_of(q)
    t, hkv, dv = ctx.shape_of(k)[1], ctx.shape_of(k)[2], ctx.shape_of(v)[3]
    g = int(hq) // int(hkv)
    emit, op = ctx.emit, relax.op
    qg = emit(op.permute_dims(emit(op.reshape(ctx.f32(q), [b, s, hkv, g, dq])), [0, 2, 3, 1, 4]))
    kt = emit(op.reshape(emit(op.permute_dims(ctx.f32(k), [0, 2, 3, 1])), [b, hkv, 1, dq, t]))
    scores = emit(op.multiply(emit(op.matmul(qg, kt)), ctx.const(scale)))
    if causal:
        mask = ctx.emit_te(lambda: causal_mask_te(s, t), name="causal_mask")
        scores = emit(op.where(mask, scores, ctx.const(float("-inf"))))
    p = emit(op.nn.softmax(scores, axis=-1))
    vv = emit(op.reshape(emit(op.permute_dims(ctx.f32(v), [0, 2, 1, 3])), [b, hkv, 1, t, dv]))
    o = emit(op.permute_dims(emit(op.matmul(p, vv)), [0, 3, 1, 2, 4]))
    return ctx.astype(emit(op.reshape(o, [b, s, hq, dv])), out_dtype)


@TABLE.register("attention.gqa", "attention.mla")
def _(ctx, node):
    a = node.attrs
    out = attention(ctx, *ctx.inputs(node), a["scale"], a["causal"], node.outputs[0].dtype)
    return Lowered("relax", "relax.matmul + where(causal) + nn.softmax + matmul", outputs=[out])


@TABLE.register("attention.mla_absorbed")
def _(ctx, node):
    a = node.attrs
    q, cache = ctx.inputs(node)
    out = ctx.emit_te(mla_split_te, q, cache, a["scale"], a["causal"], a["kv_lora_rank"], node.outputs[0].dtype,
                      name="mla_absorbed", primfunc_attrs={KERNEL_ATTR: KERNEL, "op_pattern": 8})
    return Lowered("tir", f"te.mla_absorbed (latent-cache MQA, split-KV in {CHUNK}-row chunks, online-softmax reduce)",
                   outputs=[out])


@TABLE.register("mla.latent_proj")
def _(ctx, node):
    a = node.attrs
    x, w, nw = ctx.inputs(node)
    kv = linear(ctx, x, w)
    c, k_pe = split_sizes(ctx, kv, (a["kv_lora_rank"], int(ctx.shape_of(w)[0]) - a["kv_lora_rank"]), -1)
    return Lowered("tir", "te.nt_matmul + split + nn.rms_norm",
                   outputs=[rms_norm(ctx, c, nw, a["eps"], node.outputs[0].dtype), k_pe])


@TABLE.register("mla.decompress")
def _(ctx, node):
    a = node.attrs
    c, k_pe, w = ctx.inputs(node)
    h, dn, dv = a["num_heads"], a["qk_nope_dim"], a["v_dim"]
    b, s = ctx.shape_of(c)[:2]
    kv = ctx.emit(relax.op.reshape(linear(ctx, c, w), [b, s, h, dn + dv]))
    k_nope, v = split_sizes(ctx, kv, (dn, dv), -1)
    k_rope = ctx.emit(relax.op.broadcast_to(k_pe, [b, s, h, ctx.shape_of(k_pe)[3]]))
    k = ctx.emit(relax.op.concat([k_nope, k_rope], axis=3))
    return Lowered("tir", "te.nt_matmul + reshape + split + concat", outputs=[k, v])
