"""Plain-loop references for DeepSeek-V4's ops (written from the paper's / transformers' definitions, one query,
one window, one expert at a time), and the shape-rule cases test_ops_domain.py folds into its tables."""
from __future__ import annotations

import math

import torch

from dsgraph.types import TensorType


def R(*shape, scale=1.0):
    return torch.randn(*shape) * scale


def compress_loop(kv, gate, state, bias, positions, past, ratio, overlap):
    """Window by window: the entry of the window ending at p pools the rows p-ratio+1..p (and, overlapping, the
    previous window's first halves) with softmax(gate + bias[pos % ratio]) weights per channel; one entry per
    group the step completes, with its first position p - ratio + 1."""
    b, s, c = kv.shape
    d = c // 2 if overlap else c
    ends = [i for i in range(s) if (past.shape[1] + i + 1) % ratio == 0]
    out = torch.zeros(b, len(ends), d)
    for bi in range(b):
        p0 = int(positions[bi, 0])
        rows = {p0 - state.shape[1] + r: (state[bi, r, :c], state[bi, r, c:]) for r in range(state.shape[1])}
        rows.update({int(positions[bi, i]): (kv[bi, i], gate[bi, i]) for i in range(s)})
        for j, i in enumerate(ends):
            p = int(positions[bi, i])
            slots = []   # (value, logit) per channel
            if overlap:
                slots += [(rows[q][0][:d], rows[q][1][:d] + bias[q % ratio, :d])
                          for q in range(p - 2 * ratio + 1, p - ratio + 1) if q >= 0]
                slots += [(rows[q][0][d:], rows[q][1][d:] + bias[q % ratio, d:]) for q in range(p - ratio + 1, p + 1)]
            else:
                slots += [(rows[q][0], rows[q][1] + bias[q % ratio]) for q in range(p - ratio + 1, p + 1)]
            vals = torch.stack([v for v, _ in slots])
            w = torch.softmax(torch.stack([g for _, g in slots]), 0)
            out[bi, j] = (vals * w).sum(0)
    return out, (positions[:, ends] - ratio + 1)


def sink_attention_loop(q, kv, sinks, positions, comp=None, indices=None, *, window, ratio=0, scale):
    """Per query and head: the visible keys (window rows, then the compact compressed entries whose group has
    ended), softmax with the sink."""
    b, s, h, d = q.shape
    n_state = kv.shape[1] - s
    out = torch.zeros(b, s, h, d)
    for bi in range(b):
        p0 = int(positions[bi, 0])
        for i in range(s):
            p = int(positions[bi, i])
            keys = [kv[bi, r] for r in range(kv.shape[1]) if 0 <= p0 - n_state + r and 0 <= p - (p0 - n_state + r)
                    < window]
            if comp is not None:
                chosen = None if indices is None else {int(t) for t in indices[bi, i] if t >= 0}
                keys += [comp[bi, j] for j in range(comp.shape[1])
                         if (j + 1) * ratio - 1 <= p and (chosen is None or j in chosen)]
            ks = torch.stack(keys)
            for hi in range(h):
                logits = ks @ q[bi, i, hi] * scale
                den = torch.exp(logits).sum() + math.exp(float(sinks[hi]))
                out[bi, i, hi] = (torch.exp(logits)[:, None] * ks).sum(0) / den
    return out


def slot_mask_loop(logits, positions, ratio):
    """-inf at entry j for a query at p unless its group (positions j*ratio .. (j+1)*ratio-1) has ended."""
    out = logits.clone()
    for bi in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            for j in range(logits.shape[2]):
                if (j + 1) * ratio - 1 > int(positions[bi, i]):
                    out[bi, i, j] = float("-inf")
    return out


def hc_pre_loop(x, fn, base, scale, iters, eps, norm_eps):
    b, s, n, d = x.shape
    col, post, comb = torch.zeros(b, s, d), torch.zeros(b, s, n), torch.zeros(b, s, n, n)
    for bi in range(b):
        for si in range(s):
            flat = x[bi, si].reshape(-1)
            mix = fn @ (flat / torch.sqrt((flat * flat).mean() + norm_eps))
            pre = torch.sigmoid(mix[:n] * scale[0] + base[:n]) + eps
            post[bi, si] = 2 * torch.sigmoid(mix[n:2 * n] * scale[1] + base[n:2 * n])
            m = torch.softmax((mix[2 * n:] * scale[2] + base[2 * n:]).reshape(n, n), -1) + eps
            for it in range(iters):
                if it:
                    m = m / (m.sum(1, keepdim=True) + eps)
                m = m / (m.sum(0, keepdim=True) + eps)
            comb[bi, si] = m
            col[bi, si] = sum(pre[j] * x[bi, si, j] for j in range(n))
    return col, post, comb


def hc_post_loop(x, y, post, comb):
    out = torch.zeros_like(x)
    b, s, n, _ = x.shape
    for bi in range(b):
        for si in range(s):
            for k in range(n):
                out[bi, si, k] = post[bi, si, k] * y[bi, si] + sum(comb[bi, si, j, k] * x[bi, si, j] for j in range(n))
    return out


def hc_head_loop(x, fn, base, scale, eps, norm_eps):
    b, s, n, d = x.shape
    out = torch.zeros(b, s, d)
    for bi in range(b):
        for si in range(s):
            flat = x[bi, si].reshape(-1)
            pre = torch.sigmoid(fn @ (flat / torch.sqrt((flat * flat).mean() + norm_eps)) * scale[0] + base) + eps
            out[bi, si] = sum(pre[j] * x[bi, si, j] for j in range(n))
    return out


def softplus_sqrt(v):
    return math.sqrt(math.log1p(math.exp(v)))


def route_v4_loop(logits, chosen, rsf):
    """Gates of the given experts per token: their sqrt(softplus) scores, renormalised, scaled."""
    w = torch.zeros(chosen.shape)
    for t in range(chosen.shape[0]):
        sc = [softplus_sqrt(float(logits[t, e])) for e in chosen[t]]
        w[t] = torch.tensor(sc) / (sum(sc) + 1e-20) * rsf
    return w


def swiglu_clamped_loop(x, g, u, d, limit):
    a, c = (x @ g.T).clamp(max=limit), (x @ u.T).clamp(-limit, limit)
    return (a * torch.sigmoid(a) * c) @ d.T


def grouped_loop(x, w):
    g = x.shape[-2]
    rows = w.shape[0] // g
    return torch.stack([x[..., j, :] @ w[j * rows:(j + 1) * rows].T for j in range(g)], -2)


def mxfp4_loop(w, s):
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    o, half = w.shape
    out = torch.zeros(o, 2 * half)
    for r in range(o):
        for j in range(2 * half):
            nib = (int(w[r, j // 2]) & 0xFF) >> (4 * (j % 2)) & 0xF
            val = table[nib & 7] * (-1 if nib & 8 else 1)
            out[r, j] = val * 2.0 ** (int(s[r, j // 32]) - 127)
    return out


def T(*shape, dt="float32"):
    return TensorType(tuple(shape), dt)


L = "int64"
GOOD = [
    ("act.swiglu_clamped", [T("N", 12)], {"limit": 1.0}, [T("N", 6)]),
    ("norm.rms_unweighted", [T("B", "S", 4, 32)], {}, [T("B", "S", 4, 32)]),
    ("cache.slide", [T("B", 7, 32), T("B", "S", 32)], {}, [T("B", 7, 32)]),
    ("v4.compress", [T("B", "S", 64), T("B", "S", 64), T("B", 7, 128), T(4, 64), T("B", "S", dt=L),
                     T("B", "T", 0, dt=L)], {"ratio": 4, "overlap": True},
     [T("B", "(S+T)//4-T//4", 32), T("B", "(S+T)//4-T//4", dt=L)]),
    ("attention.sink", [T("B", "S", 4, 32), T("B", "S+7", 32), T(4), T("B", "S", dt=L), T("B", "(S+T)//4", 32),
                        T("B", "S", 2, dt=L)], {"window": 8, "ratio": 4, "scale": 0.2}, [T("B", "S", 4, 32)]),
    ("indexer.slot_mask", [T("B", "S", "T//4"), T("B", "S", dt=L)], {"ratio": 4}, [T("B", "S", "T//4")]),
    ("linear.grouped", [T("B", "S", 2, 64), T(32, 64)], {}, [T("B", "S", 2, 16)]),
    ("hc.pre", [T("B", "S", 4, 32), T(24, 128), T(24), T(3)], {},
     [T("B", "S", 32), T("B", "S", 4), T("B", "S", 4, 4)]),
    ("hc.post", [T("B", "S", 4, 32), T("B", "S", 32), T("B", "S", 4), T("B", "S", 4, 4)], {}, [T("B", "S", 4, 32)]),
    ("hc.head", [T("B", "S", 4, 32), T(4, 128), T(4), T(1)], {}, [T("B", "S", 32)]),
    ("moe.route_sqrtsoftplus", [T("N", 8), T(8)], {"top_k": 2}, [T("N", 2), T("N", 2, dt=L)]),
    ("moe.route_hash", [T("N", 8), T(128, 2, dt=L), T("N", dt=L)], {}, [T("N", 2), T("N", 2, dt=L)]),
    ("mlp.swiglu_clamped", [T("N", 8), T(6, 8), T(6, 8), T(8, 6)], {"limit": 1.0}, [T("N", 8)]),
    ("moe.experts_clamped", [T("N", 8), T("N", 2), T("N", 2, dt=L), T(6, 8), T(6, 8), T(8, 6)],
     {"num_experts": 1, "limit": 1.0}, [T("N", 8)]),
    ("dequant_mxfp4", [T(6, 32, dt="int8"), T(6, 2, dt="uint8")], {}, [T(6, 64)]),
]
BAD = [
    ("act.swiglu_clamped", [T(3, 7)], {"limit": 1.0}, r"must be even"),
    ("norm.rms_unweighted", [T(2, 3, dt=L)], {}, r"must be a float tensor"),
    ("cache.slide", [T(1, 7, 32), T(1, 2, 16)], {}, r"differ"),
    ("v4.compress", [T(1, 2, 64), T(1, 2, 64), T(1, 3, 128), T(4, 64), T(1, 2, dt=L), T(1, 5, 0, dt=L)],
     {"ratio": 4, "overlap": True}, r"state must be \[B,7,128\]"),
    ("v4.compress", [T(1, 2, 64), T(1, 2, 64), T(1, 7, 128), T(4, 64), T(1, 2, dt=L), T(2, 5, 0, dt=L)],
     {"ratio": 4, "overlap": True}, r"past .* must be \[B, T, ...\]"),
    ("attention.sink", [T(1, 2, 4, 32), T(1, 9, 32), T(3), T(1, 2, dt=L)], {"window": 8, "scale": 0.2},
     r"sinks must be \[4\]"),
    ("indexer.slot_mask", [T(1, 2, 3), T(1, 2, dt=L)], {"ratio": 0}, r"must be positive"),
    ("indexer.slot_mask", [T(1, 2, 3), T(1, 3, dt=L)], {"ratio": 4}, r"positions .* must be \[B,S\]"),
    ("linear.grouped", [T(1, 2, 3, 64), T(32, 64)], {}, r"do not split into 3 groups"),
    ("hc.pre", [T(1, 2, 4, 32), T(20, 128), T(24), T(3)], {}, r"fn must be \[24, 4\*32\]"),
    ("hc.post", [T(1, 2, 4, 32), T(1, 2, 16), T(1, 2, 4), T(1, 2, 4, 4)], {}, r"do not fit streams"),
    ("hc.head", [T(1, 2, 4, 32), T(4, 128), T(4), T(3)], {}, r"scale must be \[1\]"),
    ("moe.route_sqrtsoftplus", [T(3, 8), T(7)], {"top_k": 2}, r"bias"),
    ("moe.route_hash", [T(3, 8), T(128, 2, dt=L), T(4, dt=L)], {}, r"ids"),
    ("mlp.swiglu_clamped", [T(3, 8), T(6, 8), T(6, 8), T(6, 8)], {"limit": 1.0}, r"do not fit"),
    ("moe.experts_clamped", [T(3, 8), T(3, 2), T(3, 2, dt=L), T(6, 8)], {"num_experts": 1, "limit": 1.0},
     r"1 weights for 1 experts"),
    ("dequant_mxfp4", [T(6, 32), T(6, 2, dt="uint8")], {}, r"int8/uint8 weight"),
]
NO_DECOMPOSITION = {"dequant_mxfp4"}   # unpacking nibbles needs bit ops the primitive set lacks


def _compress_inputs(b, s, c, ratio, overlap, p0):
    rows = (2 if overlap else 1) * ratio - 1
    pos = (p0 + torch.arange(s)).expand(b, s).contiguous()
    return R(b, s, c), R(b, s, c), R(b, rows, 2 * c), R(ratio, c), pos, torch.zeros(b, p0, 0, dtype=torch.long)


def _sink_inputs(b, s, h, d, window, p0, t=None, k=None):
    """t: compact entries (default: one past the last query's, never visible)."""
    t = (p0 + s) // 4 + 1 if t is None else t
    pos = (p0 + torch.arange(s)).expand(b, s).contiguous()
    ins = (R(b, s, h, d), R(b, window - 1 + s, d), R(h), pos)
    if k is None:
        return ins
    return ins + (R(b, t, d), torch.randint(-1, t, (b, s, k)))


def _hash_table(v, k, e):
    return torch.stack([torch.randperm(e)[:k] for _ in range(v)])


def add_reference_cases(ref):
    """Register the V4 ops' reference-vs-loop cases with test_ops_domain's `ref` (odd sizes, starts past 0)."""
    for ratio, overlap, p0 in [(4, True, 0), (4, True, 6), (3, False, 5), (8, False, 0)]:
        ref("v4.compress", lambda a=(2, 11, 6, ratio, overlap, p0): _compress_inputs(*a),
            lambda *t, r=ratio, o=overlap: compress_loop(*t, r, o), ratio=ratio, overlap=overlap)
    ref("norm.rms_unweighted", lambda: (R(2, 3, 7),), lambda x: x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5),
        eps=1e-5)
    ref("act.swiglu_clamped", lambda: (R(5, 12, scale=2.0),),
        lambda gu: torch.nn.functional.silu(gu[:, :6].clamp(max=0.7)) * gu[:, 6:].clamp(-0.7, 0.7), limit=0.7)
    ref("cache.slide", lambda: (R(2, 5, 3), R(2, 3, 3)), lambda st, new: torch.cat((st, new), 1)[:, -5:])
    ref("cache.slide", lambda: (R(2, 3, 3), R(2, 7, 3)), lambda st, new: new[:, -3:])
    ref("attention.sink", lambda: _sink_inputs(2, 9, 3, 8, 4, 2),
        lambda *t: sink_attention_loop(*t, window=4, scale=0.3), window=4, scale=0.3)
    ref("attention.sink", lambda: _sink_inputs(2, 6, 2, 8, 5, 7, k=3),
        lambda *t: sink_attention_loop(*t, window=5, ratio=4, scale=0.3), window=5, ratio=4, scale=0.3)
    ref("attention.sink", lambda: _sink_inputs(1, 10, 2, 8, 4, 0, k=None) + (R(1, 4, 8),),
        lambda *t: sink_attention_loop(*t, window=4, ratio=3, scale=0.3), window=4, ratio=3, scale=0.3)
    ref("indexer.slot_mask", lambda: (R(2, 3, 9), torch.tensor([[3, 4, 5], [10, 11, 12]])),
        lambda x, p: slot_mask_loop(x, p, 3), ratio=3)
    ref("linear.grouped", lambda: (R(2, 3, 4, 5), R(12, 5)), grouped_loop)
    ref("hc.pre", lambda: (R(2, 3, 4, 5), R(24, 20), R(24), R(3)),
        lambda *t: hc_pre_loop(*t, 20, 1e-6, 1e-6))
    ref("hc.pre", lambda: (R(1, 2, 2, 7), R(8, 14), R(8), R(3)),
        lambda *t: hc_pre_loop(*t, 3, 1e-3, 1e-5), iters=3, eps=1e-3, norm_eps=1e-5)
    ref("hc.post", lambda: (R(2, 3, 4, 5), R(2, 3, 5), R(2, 3, 4), torch.rand(2, 3, 4, 4)), hc_post_loop)
    ref("hc.head", lambda: (R(2, 3, 4, 5), R(4, 20), R(4), R(1)), lambda *t: hc_head_loop(*t, 1e-6, 1e-6))
    ref("moe.route_sqrtsoftplus", lambda: (R(7, 9, scale=3.0), torch.rand(9)),
        lambda lg, bias: _ssp_loop(lg, bias, 3, 1.5), top_k=3, routed_scaling_factor=1.5)
    ref("moe.route_hash", lambda: (R(7, 9, scale=3.0), _hash_table(20, 2, 9), torch.randint(0, 20, (7,))),
        lambda lg, tab, ids: (route_v4_loop(lg, tab[ids], 2.5), tab[ids]), routed_scaling_factor=2.5)
    for limit in (0.3, 50.0):
        ref("mlp.swiglu_clamped", lambda: (R(5, 8), R(6, 8), R(6, 8), R(8, 6)),
            lambda *t, m=limit: swiglu_clamped_loop(*t, m), limit=limit)
        ref("moe.experts_clamped", lambda: (R(5, 8), torch.rand(5, 2), torch.tensor([[0, 2]] * 3 + [[2, 1]] * 2),
                                            *[R(6, 8) if j % 3 < 2 else R(8, 6) for j in range(9)]),
            lambda x, w, idx, *ws, m=limit: _experts_loop(x, w, idx, ws, m), num_experts=3, limit=limit)
    ref("dequant_mxfp4", lambda: (torch.randint(-128, 128, (3, 32), dtype=torch.int8),
                                  torch.randint(120, 134, (3, 2), dtype=torch.uint8)), mxfp4_loop)


def _ssp_loop(logits, bias, k, rsf):
    chosen = torch.tensor([sorted(range(logits.shape[1]), key=lambda e: -(softplus_sqrt(float(logits[t, e]))
                                                                          + float(bias[e])))[:k]
                           for t in range(logits.shape[0])])
    return route_v4_loop(logits, chosen, rsf), chosen


def _experts_loop(x, w, idx, ws, limit):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(idx[t].tolist()):
            out[t] += w[t, j] * swiglu_clamped_loop(x[t:t + 1], *ws[3 * e:3 * e + 3], limit)[0]
    return out
