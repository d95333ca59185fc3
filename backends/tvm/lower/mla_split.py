"""Absorbed MLA (every head attending to the shared latent cache [B, T, C+R]) as split-KV TE: the cache is cut into
chunks of CHUNK rows; each chunk yields, per query and head, its score max, its sum of exp(score - max) and its
exp-weighted sum of latent rows; a second stage rescales the chunks by exp(chunk max - overall max) and
divides (the online-softmax reduce of FlashDecoding). On CUDA schedule_mla.py gives each (batch, query, chunk)
a thread block for all heads; on llvm it runs as written.

Query s sits at absolute position T - S + s and sees cache rows 0..T - S + s (causal); rows past T in the last
chunk are masked. A chunk with no visible row has max -inf and contributes nothing (its max is taken as 0
inside the chunk so no inf - inf appears).
"""
from __future__ import annotations

from ..deps import te, tirx

CHUNK = 128  # cache rows per chunk: fewer chunks = fewer fp32 partials through memory, less parallelism
KERNEL = "mla_split_kv"


def _neg_inf():
    return tirx.const(float("-inf"), "float32")


def mla_split_te(q, cache, scale: float, causal: bool, c: int, out_dtype: str):
    """q [B,S,H,C+R], cache [B,T,C+R] -> [B,S,H,C] in fp32."""
    bsz, s, h, w = q.shape
    t = cache.shape[1]
    parts = (t + CHUNK - 1) // CHUNK

    def row(p, jj):
        return tirx.min(p * CHUNK + jj, t - 1)

    def visible(i, p, jj):
        j = p * CHUNK + jj
        return tirx.all(j < t, j <= i + (t - s)) if causal else j < t

    r = te.reduce_axis((0, w), name="r")
    qk = te.compute((bsz, s, h, parts, CHUNK), lambda b, i, hh, p, jj: te.sum(
        q[b, i, hh, r].astype("float32") * cache[b, row(p, jj), r].astype("float32"), axis=r), name="mla_qk")
    score = te.compute(qk.shape, lambda b, i, hh, p, jj: tirx.Select(
        visible(i, p, jj), qk[b, i, hh, p, jj] * scale, _neg_inf()), name="mla_score")
    r1 = te.reduce_axis((0, CHUNK), name="r1")
    cmax = te.compute((bsz, s, h, parts), lambda b, i, hh, p: te.max(score[b, i, hh, p, r1], axis=r1),
                      name="mla_chunk_max")
    pexp = te.compute(qk.shape, lambda b, i, hh, p, jj: tirx.exp(score[b, i, hh, p, jj] - tirx.Select(
        cmax[b, i, hh, p] == _neg_inf(), tirx.const(0.0, "float32"), cmax[b, i, hh, p])), name="mla_p")
    r2 = te.reduce_axis((0, CHUNK), name="r2")
    csum = te.compute(cmax.shape, lambda b, i, hh, p: te.sum(pexp[b, i, hh, p, r2], axis=r2), name="mla_chunk_sum")
    r3 = te.reduce_axis((0, CHUNK), name="r3")
    cout = te.compute((bsz, s, h, parts, c), lambda b, i, hh, p, cc: te.sum(
        pexp[b, i, hh, p, r3] * cache[b, row(p, r3), cc].astype("float32"), axis=r3), name="mla_chunk_out")
    rp = te.reduce_axis((0, parts), name="rp")
    mx = te.compute((bsz, s, h), lambda b, i, hh: te.max(cmax[b, i, hh, rp], axis=rp), name="mla_max")
    rp2 = te.reduce_axis((0, parts), name="rp2")
    den = te.compute((bsz, s, h), lambda b, i, hh: te.sum(
        csum[b, i, hh, rp2] * tirx.exp(cmax[b, i, hh, rp2] - mx[b, i, hh]), axis=rp2), name="mla_den")
    rp3 = te.reduce_axis((0, parts), name="rp3")
    num = te.compute((bsz, s, h, c), lambda b, i, hh, cc: te.sum(
        cout[b, i, hh, rp3, cc] * tirx.exp(cmax[b, i, hh, rp3] - mx[b, i, hh]), axis=rp3), name="mla_num")
    return te.compute((bsz, s, h, c), lambda b, i, hh, cc: (num[b, i, hh, cc] / den[b, i, hh]).astype(out_dtype),
                      name="mla_out")
