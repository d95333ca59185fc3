"""DeepSeek Sparse Attention written as plain loops (per query, per head), the yardstick of the op references and
kernels: indexer scores, their top-k, sparse MLA, LayerNorm. Slow on purpose; tiny sizes only."""
from __future__ import annotations

import math

import torch


def indexer_logits_loop(q, k, w, scale, causal=True):
    b, s, h, _ = q.shape
    t = k.shape[1]
    out = torch.full((b, s, t), float("-inf"))
    for i in range(b):
        for j in range(s):
            for p in range(t if not causal else t - s + j + 1):
                out[i, j, p] = sum(float(w[i, j, n]) * max(float(q[i, j, n] @ k[i, p]), 0.0) for n in range(h)) * scale
    return out


def topk_loop(logits, k):
    b, s, _ = logits.shape
    out = torch.full((b, s, k), -1, dtype=torch.int64)
    for i in range(b):
        for j in range(s):
            row = [(-float(v), p) for p, v in enumerate(logits[i, j]) if math.isfinite(float(v))]
            for slot, (_, p) in enumerate(sorted(row)[:k]):
                out[i, j, slot] = p
    return out


def sparse_attention_loop(q, k, v, idx, scale, causal=True):
    """q [B,S,H,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv]; only the selected (and causal) positions are attended."""
    b, s, h, _ = q.shape
    t, hkv = k.shape[1], k.shape[2]
    out = torch.zeros(b, s, h, v.shape[3])
    for i in range(b):
        for j in range(s):
            pos = sorted({int(p) for p in idx[i, j] if p >= 0 and (not causal or p <= t - s + j)})
            for n in range(h):
                kv = n // (h // hkv)
                sc = torch.stack([q[i, j, n] @ k[i, p, kv] for p in pos]) * scale
                out[i, j, n] = torch.softmax(sc, 0) @ torch.stack([v[i, p, kv] for p in pos])
    return out


def layer_norm_loop(x, w, bias, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + bias


def causal_topk_indices(b, s, t, k, gen):
    """Random distinct causal positions per query (fewer than k where the horizon is short, -1 after)."""
    out = torch.full((b, s, k), -1, dtype=torch.int64)
    for i in range(b):
        for j in range(s):
            horizon = t - s + j + 1
            n = min(k, horizon)
            out[i, j, :n] = torch.randperm(horizon, generator=gen)[:n]
    return out


def quant_fp8_loop(x, group):
    """Per row and group of `group` values: scale = amax / 448, values divided by it and rounded to e4m3."""
    rows = x.reshape(-1, x.shape[-1])
    q = torch.empty(rows.shape, dtype=torch.float8_e4m3fn)
    scales = torch.empty(rows.shape[0], x.shape[-1] // group)
    for i in range(rows.shape[0]):
        for g in range(scales.shape[1]):
            part = rows[i, g * group:(g + 1) * group]
            scales[i, g] = max(float(part.abs().max()), 1e-12) / 448.0
            q[i, g * group:(g + 1) * group] = (part / scales[i, g]).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), scales.reshape(x.shape[:-1] + (scales.shape[1],))


def rotate_quant_parts_loop(x):
    """DeepSeek's indexer FP8 path per row: x @ H / sqrt(D) (H = kron of [[1, 1], [1, -1]]), then each group of 128
    (or the row) divided by 2**ceil(log2(max(amax, 1e-4) / 448)) and rounded to e4m3: (e4m3 rows, scales)."""
    d = x.shape[-1]
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    rows = (x.reshape(-1, d) @ h) / math.sqrt(d)
    g = min(128, d)
    out = torch.empty(rows.shape, dtype=torch.float8_e4m3fn)
    scales = torch.empty(rows.shape[0], d // g)
    for i in range(rows.shape[0]):
        for j in range(0, d, g):
            part = rows[i, j:j + g]
            scales[i, j // g] = s = 2.0 ** math.ceil(math.log2(max(float(part.abs().max()), 1e-4) / 448.0))
            out[i, j:j + g] = (part / s).to(torch.float8_e4m3fn)
    return out.reshape(x.shape), scales.reshape(x.shape[:-1] + (d // g,))


def rotate_quant_loop(x):
    """rotate_quant_parts_loop's e4m3 rows multiplied back by their scales."""
    q, s = rotate_quant_parts_loop(x)
    return q.float() * s.repeat_interleave(q.shape[-1] // s.shape[-1], -1)
