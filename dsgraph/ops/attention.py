"""Attention ops: GQA/MHA, naive MLA (decompressed per-head K/V) and absorbed MLA
(MQA over the kv_lora + rope latent cache), any of them with the query's RoPE folded
in (attention.with_rope), plus the cache update they read.

All are causal with the query block at the end of the key sequence: query i of S
sits at absolute position T - S + i and sees keys 0..T - S + i. Scores and softmax
are computed in fp32.
"""
from __future__ import annotations

import torch

from ..types import TensorType
from .common import expect_float, expect_int, expect_rank, f32, same_dtype
from .norm import rms_norm_ref
from .registry import Attr, defop, expect, get_op
from .rope import ROPE_ATTRS, rope_ref

ATTN_ATTRS = {"scale": Attr(float), "causal": Attr(bool, True)}


def attention_ref(q, k, v, scale, causal):
    """q [B,S,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv] -> [B,S,Hq,Dv] (fp32). Query heads are grouped over their
    shared K/V head instead of K/V being repeated per query head (absorbed MLA shares one latent head among 128
    query heads: repeating it would take 72 GiB at batch 64, 4096 cached tokens)."""
    b, sq, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    qg = f32(q).reshape(b, sq, hkv, hq // hkv, d)
    s = torch.einsum("bskgd,btkd->bkgst", qg, f32(k)) * scale
    if causal:
        t = k.shape[1]
        mask = torch.arange(t, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + (t - sq)
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bkgst,btkd->bskgd", p, f32(v)).reshape(b, sq, hq, dv)


def _attn_types(q, k, v, what):
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        expect_rank(t, 4, f"{what} {n} [B, S|T, H, D]")
        expect_float(t, f"{what} {n}")
    same_dtype(q, k, v)
    expect(q.shape[0] == k.shape[0] == v.shape[0], f"{what}: batch dims differ ({q}, {k}, {v})")
    expect(k.shape[1] == v.shape[1], f"{what}: k {k} and v {v} lengths differ")
    expect(k.shape[2] == v.shape[2], f"{what}: k and v head counts differ ({k}, {v})")
    expect(q.shape[3] == k.shape[3], f"{what}: q and k head dims differ ({q}, {k})")
    return TensorType(q.shape[:3] + (v.shape[3],), q.dtype)


GQA = defop("attention.gqa", "q k v", ATTN_ATTRS,
            "Grouped-query (or multi-head when Hkv == Hq) causal attention.", level="domain")


@GQA.infer
def _(q, k, v, scale, causal):
    out = _attn_types(q, k, v, "attention.gqa")
    hq, hkv = q.shape[2], k.shape[2]
    expect(isinstance(hq, int) and isinstance(hkv, int) and hq % hkv == 0,
           f"attention.gqa: {hq} query heads are not a multiple of {hkv} kv heads")
    return out


GQA.reference(attention_ref)

MLA = defop("attention.mla", "q k v", ATTN_ATTRS,
            "Naive MLA attention over decompressed per-head keys [nope | rope] and values "
            "(multi-head; the qk and v head dims differ).", level="domain")


@MLA.infer
def _(q, k, v, scale, causal):
    out = _attn_types(q, k, v, "attention.mla")
    expect(q.shape[2] == k.shape[2], f"attention.mla: q has {q.shape[2]} heads, k {k.shape[2]}")
    return out


MLA.reference(attention_ref)

MLA_ABSORBED = defop("attention.mla_absorbed", "q cache", {**ATTN_ATTRS, "kv_lora_rank": Attr(int)},
                     "Absorbed MLA: q [B,S,H,C+R] (q_nope @ W_UK | q_rope) against the latent cache "
                     "[B,T,C+R] shared by all heads; values are the first C cache dims; out [B,S,H,C].",
                     level="domain")


@MLA_ABSORBED.infer
def _(q, cache, scale, causal, kv_lora_rank):
    expect_rank(q, 4, "attention.mla_absorbed q [B,S,H,C+R]")
    expect_rank(cache, 3, "attention.mla_absorbed cache [B,T,C+R]")
    same_dtype(q, cache)
    expect(q.shape[3] == cache.shape[2], f"attention.mla_absorbed: q {q} and cache {cache} widths differ")
    expect(q.shape[0] == cache.shape[0], f"attention.mla_absorbed: batch differs ({q}, {cache})")
    expect(isinstance(q.shape[3], int) and 0 < kv_lora_rank < q.shape[3],
           f"attention.mla_absorbed: kv_lora_rank {kv_lora_rank} must be below width {q.shape[3]}")
    return TensorType(q.shape[:3] + (kv_lora_rank,), q.dtype)


@MLA_ABSORBED.reference
def mla_absorbed_ref(q, cache, scale, causal, kv_lora_rank):
    k = cache[:, :, None, :]
    v = cache[:, :, None, :kv_lora_rank]
    return attention_ref(q, k, v, scale, causal)


CACHE_APPEND = defop("cache.append", "cache new", {},
                     "Functional KV-cache update: concat(cache [B,T,...], new [B,S,...]) along dim 1 -> [B,T+S,...]. "
                     "Backends with preallocated caches write `new` in place.", level="domain")


@CACHE_APPEND.infer
def _(cache, new):
    expect(cache.rank == new.rank and cache.rank >= 2, f"cache.append: ranks differ ({cache}, {new})")
    expect(cache.shape[0] == new.shape[0] and cache.shape[2:] == new.shape[2:],
           f"cache.append: cache {cache} and new entries {new} differ off the length dim")
    same_dtype(cache, new)
    return TensorType((cache.shape[0], cache.shape[1] + new.shape[1]) + cache.shape[2:], cache.dtype)


CACHE_APPEND.reference(lambda cache, new: torch.cat((cache, new), dim=1))

LATENT = defop("mla.latent_proj", "x weight norm_weight", {"kv_lora_rank": Attr(int), "eps": Attr(float, 1e-6)},
               "MLA's shared KV down-projection: kv_a_proj_with_mqa(x) split into the latent c_kv [..,C] "
               "(RMS-normed by kv_a_layernorm) and the un-roped rope key k_pe [..,R].",
               num_outputs=2, level="domain")


@LATENT.infer
def _(x, w, nw, kv_lora_rank, eps):
    expect(w.rank == 2 and w.shape[1] == x.shape[-1],
           f"mla.latent_proj: weight must be [C+R, {x.shape[-1]}], got {w}")
    expect(nw.shape == (kv_lora_rank,), f"mla.latent_proj: norm weight must be [{kv_lora_rank}], got {nw}")
    rope = w.shape[0] - kv_lora_rank
    expect(isinstance(rope, int) and rope > 0, f"mla.latent_proj: weight rows {w.shape[0]} <= kv_lora_rank")
    same_dtype(x, w, nw)
    return TensorType(x.shape[:-1] + (kv_lora_rank,), x.dtype), TensorType(x.shape[:-1] + (rope,), x.dtype)


@LATENT.reference
def _(x, w, nw, kv_lora_rank, eps):
    kv = torch.nn.functional.linear(f32(x), f32(w)).to(x.dtype)
    c, k_pe = kv.split([kv_lora_rank, kv.shape[-1] - kv_lora_rank], dim=-1)
    return rms_norm_ref(c, nw, eps), k_pe


DECOMPRESS = defop("mla.decompress", "c_kv k_pe weight",
                   {"num_heads": Attr(int), "qk_nope_dim": Attr(int), "v_dim": Attr(int)},
                   "Naive MLA: kv_b_proj(c_kv) per head -> [k_nope | v]; k = [k_nope | k_pe broadcast "
                   "to every head]. c_kv [B,S,C], k_pe [B,S,1,R] (roped) -> k [B,S,H,nope+R], v [B,S,H,v].",
                   num_outputs=2, level="domain")


@DECOMPRESS.infer
def _(c, k_pe, w, num_heads, qk_nope_dim, v_dim):
    expect_rank(c, 3, "mla.decompress c_kv [B,S,C]")
    expect_rank(k_pe, 4, "mla.decompress k_pe [B,S,1,R]")
    expect(k_pe.shape[:2] == c.shape[:2] and k_pe.shape[2] == 1, f"mla.decompress: k_pe {k_pe} vs c_kv {c}")
    expect(w.shape == (num_heads * (qk_nope_dim + v_dim), c.shape[2]),
           f"mla.decompress: kv_b weight must be [{num_heads}*({qk_nope_dim}+{v_dim}), {c.shape[2]}], got {w}")
    same_dtype(c, k_pe, w)
    b, s = c.shape[:2]
    return (TensorType((b, s, num_heads, qk_nope_dim + k_pe.shape[3]), c.dtype),
            TensorType((b, s, num_heads, v_dim), c.dtype))


@DECOMPRESS.reference
def _(c, k_pe, w, num_heads, qk_nope_dim, v_dim):
    kv = torch.nn.functional.linear(f32(c), f32(w)).to(c.dtype)
    kv = kv.view(c.shape[0], c.shape[1], num_heads, qk_nope_dim + v_dim)
    k_nope, v = kv.split([qk_nope_dim, v_dim], dim=-1)
    k = torch.cat((k_nope, k_pe.expand(-1, -1, num_heads, -1)), dim=-1)
    return k, v


# ---------------------------------------------------------------- decompositions
def _f32(b, v):
    return v if v.dtype == "float32" else b.cast(v, dtype="float32")


def attention_decomposition(b, q, k, v, scale, causal, keep=None):
    """q [B,S,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv] -> [B,S,Hq,Dv] in primitives, fp32 inside; `keep`, a bool
    [B,S,T], masks out the keys a sparse attention did not select.

    Query head h reads kv head h // (Hq/Hkv), as repeat_interleave does: q is viewed
    as [B,Hkv,g,S,D] so one batched matmul serves the g query heads of each kv head
    without copying K or V.
    """
    bs, s, hq, dq = q.shape
    t, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    qg = b.permute(b.reshape(_f32(b, q), shape=(bs, s, hkv, g, dq)), dims=(0, 2, 3, 1, 4))
    kt = b.reshape(b.permute(_f32(b, k), dims=(0, 2, 3, 1)), shape=(bs, hkv, 1, dq, t))
    scores = b.mul(b.matmul(qg, kt), b.constant(value=scale))
    if causal:
        scores = b.where(b.causal_mask(q, k), scores, b.constant(value=float("-inf")))
    if keep is not None:
        scores = b.where(b.reshape(keep, shape=(bs, 1, 1, s, t)), scores, b.constant(value=float("-inf")))
    p = b.softmax(scores, dim=-1)
    vv = b.reshape(b.permute(_f32(b, v), dims=(0, 2, 1, 3)), shape=(bs, hkv, 1, t, dv))
    o = b.permute(b.matmul(p, vv), dims=(0, 3, 1, 2, 4))
    o = b.reshape(o, shape=(bs, s, hq, dv))
    return o if q.dtype == "float32" else b.cast(o, dtype=q.dtype)


GQA.decomposition(attention_decomposition)
MLA.decomposition(attention_decomposition)


@MLA_ABSORBED.decomposition
def _(b, q, cache, scale, causal, kv_lora_rank):
    """MQA over the latent: one kv head whose key is the whole cache row and value its first C dims."""
    bs, t, w = cache.shape
    k = b.reshape(cache, shape=(bs, t, 1, w))
    v = b.reshape(b.slice(cache, dim=2, start=0, end=kv_lora_rank), shape=(bs, t, 1, kv_lora_rank))
    return attention_decomposition(b, q, k, v, scale, causal)


@CACHE_APPEND.decomposition
def _(b, cache, new):
    return b.concat(cache, new, dim=1)


@LATENT.decomposition
def _(b, x, w, nw, kv_lora_rank, eps):
    c, k_pe = b.split(b.linear(x, w), sizes=(kv_lora_rank, w.shape[0] - kv_lora_rank), dim=-1)
    return b.norm.rms(c, nw, eps=eps), k_pe


@DECOMPRESS.decomposition
def _(b, c, k_pe, w, num_heads, qk_nope_dim, v_dim):
    bs, s = c.shape[:2]
    kv = b.reshape(b.linear(c, w), shape=(bs, s, num_heads, qk_nope_dim + v_dim))
    k_nope, v = b.split(kv, sizes=(qk_nope_dim, v_dim), dim=-1)
    k_rope = b.expand(k_pe, shape=(bs, s, num_heads, k_pe.shape[3]))
    return b.concat(k_nope, k_rope, dim=-1), v


# RoPE on the query, folded into attention ------------------------------------------------------------------
# the inner ops by name (V3.2's sparse ones live in ops/dsa.py, which imports this module)
ROPE_INNER = ("attention.gqa", "attention.mla", "attention.mla_absorbed", "attention.mla_sparse",
              "attention.mla_sparse_absorbed")

WITH_ROPE = defop("attention.with_rope", "q positions *operands",
                  {"inner": Attr(str, choices=ROPE_INNER), "rope_dims": Attr(int), **ATTN_ATTRS,
                   "kv_lora_rank": Attr(int, 0), **ROPE_ATTRS},
                  "Attention `inner` on a query whose last `rope_dims` dims get RoPE at `positions` first, so a "
                  "kernel can rotate q as it loads it instead of in a separate pass (the cached keys are "
                  "already rotated). `operands` are the inner op's inputs after q (k v, the latent cache, and "
                  "the selected indices for the sparse forms).",
                  level="domain")


def _with_rope_parts(inner, attrs):
    """(the inner op, rope attrs, inner attention attrs)."""
    op = get_op(inner)
    rope = {key: attrs[key] for key in ROPE_ATTRS}
    attn = {key: attrs[key] for key in ATTN_ATTRS}
    if "kv_lora_rank" in op.attrs:
        attn["kv_lora_rank"] = attrs["kv_lora_rank"]
    return op, rope, attn


@WITH_ROPE.infer
def _(q, positions, *operands, inner, rope_dims, **attrs):
    d = q.shape[-1]
    expect(isinstance(d, int) and 0 < rope_dims <= d and rope_dims % 2 == 0,
           f"attention.with_rope: rope_dims={rope_dims} must be even and at most q's head dim in {q}")
    op, _, attn = _with_rope_parts(inner, attrs)
    expect(len(operands) == len(op.inputs) - 1,
           f"attention.with_rope: {inner} takes {' '.join(op.inputs)}, got q and {len(operands)} after positions")
    expect_int(positions, "attention.with_rope positions")
    expect(positions.shape == q.shape[:2], f"attention.with_rope: positions {positions} must be [B, S] of q {q}")
    return op.infer_fn(q, *operands, **attn)


@WITH_ROPE.reference
def _(q, positions, *operands, inner, rope_dims, **attrs):
    op, rope, attn = _with_rope_parts(inner, attrs)
    keep = q.shape[-1] - rope_dims
    q = torch.cat((q[..., :keep], rope_ref(q[..., keep:], positions, **rope).to(q.dtype)), dim=-1)
    return op.reference_fn(q, *operands, **attn)


@WITH_ROPE.decomposition
def _(b, q, positions, *operands, inner, rope_dims, **attrs):
    _, rope, attn = _with_rope_parts(inner, attrs)
    keep = q.shape[-1] - rope_dims
    if keep == 0:
        q = b.op("rope", q, positions, **rope)
    else:
        q_keep, q_rot = b.split(q, sizes=(keep, rope_dims), dim=-1)
        q = b.concat(q_keep, b.op("rope", q_rot, positions, **rope), dim=-1)
    return b.op(inner, q, *operands, **attn)
