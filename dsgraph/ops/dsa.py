"""DeepSeek Sparse Attention (V3.2): the lightning indexer's scores, their top-k, and MLA over the selected keys.

As DeepSeek-V3.2-Exp's `inference/model.py` (class `Indexer`) and transformers' `DeepseekV32Indexer` define it:

    logits[b, s, t] = sum_h weights[b, s, h] * relu(q[b, s, h] . k[b, t]) * scale     (fp32; -inf where t > s)
    indices[b, s]   = the min(topk, T) positions of the largest logits, -1 in the slots past that
    out             = MLA attention of each query over its selected positions only (naive or absorbed form)

`scale` carries softmax_scale * index_n_heads**-0.5 (ReLU commutes with a positive factor). The reference's
Hadamard rotation of q and k is orthogonal, so q . k is unchanged without it; it matters only before FP8
quantisation, which the default path (like transformers') does not do. `fp8=True` follows the reference's FP8
numerics instead (rotation, e4m3 with power-of-two scales: dsa_fp8.py); the model builder emits fp8=False.
Ties among equal logits go to the lower position (a stable sort), which the kernels follow; transformers'
`torch.topk` leaves tie order unspecified.
"""
from __future__ import annotations

import torch

from ..types import TensorType
from .attention import ATTN_ATTRS, _attn_types, attention_decomposition
from .common import expect_float, expect_int, expect_rank, f32, same_dtype, widest
from .dsa_fp8 import GROUP, rotate_quant_decomposition, rotate_quant_parts, rotate_quant_ref, rotate_quant_rows
from .registry import Attr, defop, expect

LOGITS = defop("indexer.logits", "q k weights",
               {"scale": Attr(float), "causal": Attr(bool, True), "fp8": Attr(bool, False)},
               "DSA lightning indexer scores: q [B,S,H,D], key cache k [B,T,D], per-head weights [B,S,H] -> fp32 "
               "[B,S,T] = sum_h weights * relu(q_h . k) * scale, -inf past each query's causal horizon; fp8: q and "
               "k Hadamard-rotated and rounded to e4m3 first, as DeepSeek's reference does.", level="domain")


@LOGITS.infer
def _(q, k, weights, scale, causal, fp8=False):
    expect_rank(q, 4, "indexer.logits q [B,S,H,D]")
    expect_rank(k, 3, "indexer.logits k [B,T,D]")
    expect_rank(weights, 3, "indexer.logits weights [B,S,H]")
    expect_float(q, "indexer.logits q")
    expect_float(weights, "indexer.logits weights")
    same_dtype(q, k)
    expect(q.shape[0] == k.shape[0] and q.shape[3] == k.shape[2],
           lambda: f"indexer.logits: q {q} and key cache {k} differ in batch or head dim")
    expect(weights.shape == q.shape[:3], lambda: f"indexer.logits: weights {weights} must be [B,S,H] of q {q}")
    d = q.shape[3]
    expect(not fp8 or (isinstance(d, int) and d & (d - 1) == 0 and (d <= GROUP or d % GROUP == 0)),
           lambda: f"indexer.logits: fp8 needs a power-of-two head dim (the Hadamard rotation), got {q}")
    return TensorType((q.shape[0], q.shape[1], k.shape[1]), "float32")


def causal_keep(s: int, t: int, device) -> torch.Tensor:
    """bool [S, T]: query i of S (at position T - S + i) sees keys 0..T - S + i."""
    return torch.arange(t, device=device)[None, :] <= torch.arange(s, device=device)[:, None] + (t - s)


@LOGITS.reference
def _(q, k, weights, scale, causal, fp8=False):
    if fp8:
        q, k = rotate_quant_ref(q), rotate_quant_ref(k)
    return _logits_ref(*widest(q, k, weights), scale, causal)


def _logits_ref(q, k, weights, scale, causal):
    scores = torch.relu(torch.einsum("bshd,btd->bsht", q, k))
    logits = torch.einsum("bsht,bsh->bst", scores, weights) * scale
    if causal:
        logits = logits.masked_fill(~causal_keep(q.shape[1], k.shape[1], q.device), float("-inf"))
    return logits


@LOGITS.decomposition
def _(b, q, k, weights, scale, causal, fp8=False):
    qf, kf = (rotate_quant_decomposition(b, q), rotate_quant_decomposition(b, k)) if fp8 else \
        (b.cast(q, dtype="float32"), b.cast(k, dtype="float32"))
    return _logits_decomposition(b, qf, kf, weights, scale, causal, q, k)


def _logits_decomposition(b, qf, kf, weights, scale, causal, q, k):
    """The scores of fp32 qf [B,S,H,D] and kf [B,T,D] in primitives (q, k: the op's inputs, for the mask)."""
    bs, s, h, d = qf.shape
    t = kf.shape[1]
    kt = b.reshape(b.permute(kf, dims=(0, 2, 1)), shape=(bs, 1, d, t))
    scores = b.maximum(b.matmul(qf, kt), b.constant(value=0.0))        # [B,S,H,T]
    w = b.reshape(b.cast(weights, dtype="float32"), shape=(bs, s, 1, h))
    logits = b.mul(b.reshape(b.matmul(w, scores), shape=(bs, s, t)), b.constant(value=scale))
    if causal:
        logits = b.where(b.causal_mask(q, k), logits, b.constant(value=float("-inf")))
    return logits


# ---------------------------------------------------------------- the FP8 indexer key cache (pass fp8_index_cache)
INDEX_QUANT = defop("indexer.quant_fp8", "x", {},
                    "Indexer keys x [..., D] -> (e4m3 [..., D], fp32 scales [..., D/min(128, D)]) of their Hadamard "
                    "rotation, as DeepSeek's reference stores its indexer key cache (dsa_fp8.py).",
                    num_outputs=2, level="domain")


@INDEX_QUANT.infer
def _(x):
    expect_float(x, "indexer.quant_fp8 input")
    d = x.shape[-1]
    expect(isinstance(d, int) and d & (d - 1) == 0 and (d <= GROUP or d % GROUP == 0),
           lambda: f"indexer.quant_fp8: needs a power-of-two last dim (the Hadamard rotation), got {x}")
    return x.with_dtype("float8_e4m3fn"), TensorType(x.shape[:-1] + (d // min(GROUP, d),), "float32")


INDEX_QUANT.reference(rotate_quant_rows)


@INDEX_QUANT.decomposition
def _(b, x):
    q, s = rotate_quant_parts(b, x)
    n = s.shape[-2]
    return b.reshape(q, shape=x.shape), b.reshape(s, shape=x.shape[:-1] + (n,))


LOGITS_FP8 = defop("indexer.logits_fp8", "q k k_scale weights", {"scale": Attr(float), "causal": Attr(bool, True)},
                   "indexer.logits(fp8=True) over an FP8 key cache: k [B,T,D] e4m3 with fp32 scales k_scale "
                   "[B,T,D/min(128, D)] as indexer.quant_fp8 makes them; q is rotated and quantised as there.",
                   level="domain")


@LOGITS_FP8.infer
def _(q, k, k_scale, weights, scale, causal):
    expect(k.dtype == "float8_e4m3fn" and k_scale.dtype == "float32",
           lambda: f"indexer.logits_fp8: keys must be float8_e4m3fn with float32 scales, got {k} and {k_scale}")
    expect(k_scale.shape[:2] == k.shape[:2] and k_scale.rank == 3,
           lambda: f"indexer.logits_fp8: k_scale {k_scale} must be [B,T,groups] of k {k}")
    return LOGITS.infer_fn(q, k.with_dtype(q.dtype), weights, scale, causal, fp8=True)


def _dequant_keys(k, k_scale):
    return (k.float().unflatten(-1, (k_scale.shape[-1], -1)) * k_scale[..., None]).flatten(-2)


@LOGITS_FP8.reference
def _(q, k, k_scale, weights, scale, causal):
    q, k, weights = widest(rotate_quant_ref(q), _dequant_keys(k, k_scale), weights)
    return _logits_ref(q, k, weights, scale, causal)


@LOGITS_FP8.decomposition
def _(b, q, k, k_scale, weights, scale, causal):
    bs, t, d = k.shape
    n = k_scale.shape[-1]
    groups = b.reshape(b.cast(k, dtype="float32"), shape=(bs, t, n, d // n))
    kf = b.reshape(b.mul(groups, b.reshape(k_scale, shape=(bs, t, n, 1))), shape=(bs, t, d))
    return _logits_decomposition(b, rotate_quant_decomposition(b, q), kf, weights, scale, causal, q, k)


TOPK = defop("indexer.topk", "logits", {"k": Attr(int)},
             "DSA top-k: int64 [B,S,k] positions of the largest finite logits [B,S,T], best first, ties to the "
             "lower position; slots past the number of finite logits (min(k, T) when causal) are -1.",
             level="domain")


@TOPK.infer
def _(logits, k):
    expect_rank(logits, 3, "indexer.topk logits [B,S,T]")
    expect_float(logits, "indexer.topk logits")
    expect(k > 0, f"indexer.topk: k={k} must be positive")
    return TensorType(logits.shape[:2] + (k,), "int64")


@TOPK.reference
def topk_ref(logits, k):
    pad = logits.new_full(logits.shape[:2] + (k,), float("-inf"))
    vals, idx = torch.sort(torch.cat((f32(logits), pad.float()), -1), dim=-1, descending=True, stable=True)
    return torch.where(torch.isneginf(vals[..., :k]), -1, idx[..., :k])


@TOPK.decomposition
def _(b, logits, k):
    bs, s, _ = logits.shape
    pad = b.expand(b.constant(value=float("-inf"), shape=(1, 1, 1), dtype=logits.dtype), shape=(bs, s, k))
    padded = b.concat(logits, pad, dim=-1)
    top = b.slice(b.argsort(padded, dim=-1, descending=True), dim=-1, start=0, end=k)
    missing = b.eq(b.gather(padded, top, dim=-1), b.constant(value=float("-inf"), dtype=logits.dtype))
    return b.where(missing, b.constant(value=-1, dtype="int64"), top)


# ---------------------------------------------------------------- sparse MLA
def _indices_type(indices, q, what):
    expect_int(indices, f"{what} indices")
    expect_rank(indices, 3, f"{what} indices [B,S,K]")
    expect(indices.shape[:2] == q.shape[:2], lambda: f"{what}: indices {indices} must be [B,S,K] of q {q}")


SPARSE = defop("attention.mla_sparse", "q k v indices", ATTN_ATTRS,
               "Naive MLA attention (as attention.mla) where query [b,s] attends only to the key positions "
               "indices[b,s,:] (int [B,S,K]; -1 = empty slot), within its causal horizon.", level="domain")


@SPARSE.infer
def _(q, k, v, indices, scale, causal):
    out = _attn_types(q, k, v, "attention.mla_sparse")
    expect(q.shape[2] == k.shape[2], f"attention.mla_sparse: q has {q.shape[2]} heads, k {k.shape[2]}")
    _indices_type(indices, q, "attention.mla_sparse")
    return out


def sparse_attention_ref(q, k, v, indices, scale, causal):
    """q [B,S,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv], indices [B,S,K] -> [B,S,Hq,Dv] (fp32): the selected rows are
    gathered (K per query, not T), empty or acausal slots masked."""
    b, s, hq, d = q.shape
    t, hkv = k.shape[1], k.shape[2]
    idx = indices.long()
    keep = idx >= 0
    if causal:
        keep &= idx <= (torch.arange(s, device=q.device) + (t - s))[None, :, None]
    rows = torch.arange(b, device=q.device)[:, None, None], idx.clamp(min=0)
    kg, vg = f32(k)[rows], f32(v)[rows]                                          # [B,S,K,Hkv,*]
    qg = f32(q).reshape(b, s, hkv, hq // hkv, d)
    scores = torch.einsum("bskgd,bsjkd->bskgj", qg, kg) * scale
    p = torch.softmax(scores.masked_fill(~keep[:, :, None, None, :], float("-inf")), dim=-1)
    return torch.einsum("bskgj,bsjkd->bskgd", p, vg).reshape(b, s, hq, v.shape[3])


SPARSE.reference(sparse_attention_ref)


def selected_keep(b, indices, keys):
    """bool [B,S,T] from indices [B,S,K] (primitives): position t is kept when some slot names it."""
    bs, s, n = indices.shape
    t = keys.shape[1]
    idx = indices if indices.dtype == "int64" else b.cast(indices, dtype="int64")
    pos = b.reshape(b.arange_like(keys, dim=1), shape=(1, 1, 1, t))
    hits = b.cast(b.eq(b.reshape(idx, shape=(bs, s, n, 1)), pos), dtype="int64")
    return b.gt(b.sum(hits, dims=(2,)), b.constant(value=0, dtype="int64"))


@SPARSE.decomposition
def _(b, q, k, v, indices, scale, causal):
    return attention_decomposition(b, q, k, v, scale, causal, keep=selected_keep(b, indices, k))


SPARSE_ABSORBED = defop("attention.mla_sparse_absorbed", "q cache indices",
                        {**ATTN_ATTRS, "kv_lora_rank": Attr(int)},
                        "Absorbed MLA (as attention.mla_absorbed, over the latent cache [B,T,C+R]) where query "
                        "[b,s] attends only to the cache rows indices[b,s,:] (-1 = empty slot); out [B,S,H,C].",
                        level="domain")


@SPARSE_ABSORBED.infer
def _(q, cache, indices, scale, causal, kv_lora_rank):
    expect_rank(q, 4, "attention.mla_sparse_absorbed q [B,S,H,C+R]")
    expect_rank(cache, 3, "attention.mla_sparse_absorbed cache [B,T,C+R]")
    same_dtype(q, cache)
    expect(q.shape[3] == cache.shape[2] and q.shape[0] == cache.shape[0],
           f"attention.mla_sparse_absorbed: q {q} and cache {cache} differ in batch or width")
    expect(isinstance(q.shape[3], int) and 0 < kv_lora_rank < q.shape[3],
           f"attention.mla_sparse_absorbed: kv_lora_rank {kv_lora_rank} must be below width {q.shape[3]}")
    _indices_type(indices, q, "attention.mla_sparse_absorbed")
    return TensorType(q.shape[:3] + (kv_lora_rank,), q.dtype)


@SPARSE_ABSORBED.reference
def _(q, cache, indices, scale, causal, kv_lora_rank):
    return sparse_attention_ref(q, cache[:, :, None, :], cache[:, :, None, :kv_lora_rank], indices, scale, causal)


@SPARSE_ABSORBED.decomposition
def _(b, q, cache, indices, scale, causal, kv_lora_rank):
    bs, t, w = cache.shape
    k = b.reshape(cache, shape=(bs, t, 1, w))
    v = b.reshape(b.slice(cache, dim=2, start=0, end=kv_lora_rank), shape=(bs, t, 1, kv_lora_rank))
    return attention_decomposition(b, q, k, v, scale, causal, keep=selected_keep(b, indices, cache))
