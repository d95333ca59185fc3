"""Domain ops: shape rules (good and bad) and references against plain torch written here
(per-head / per-token loops, complex-number RoPE, Hugging Face's RoPE frequencies),
plus the MoE routing semantics DeepSeek's variants depend on."""
from __future__ import annotations

import math

import pytest
import torch
from dsa_loops import (
    causal_topk_indices,
    indexer_logits_loop,
    layer_norm_loop,
    quant_fp8_loop,
    rotate_quant_loop,
    rotate_quant_parts_loop,
    sparse_attention_loop,
    topk_loop,
)
from test_ops import assert_close, one_node
from v4_loops import BAD as V4_BAD
from v4_loops import GOOD as V4_GOOD
from v4_loops import add_reference_cases

from dsgraph import GraphBuilder, ShapeError, TensorType
from dsgraph.ops import all_ops

G = torch.Generator().manual_seed(11)


def R(*shape, scale=1.0):
    return torch.randn(shape, generator=G) * scale


def rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def swiglu(x, g, u, d):
    a = x @ g.T
    return (a / (1 + torch.exp(-a)) * (x @ u.T)) @ d.T


REF = []
COVERED = set()


def ref(op, make, want, tol=1e-5, **attrs):
    COVERED.add(op)
    REF.append(pytest.param(op, make, want, attrs, tol, id=f"{op}-{len(REF)}"))


# ---------------------------------------------------------------- norms, MLP, FP8
for _s in [(3, 16), (2, 5, 7)]:
    ref("norm.rms", lambda s=_s: (R(*s), R(s[-1])), lambda x, w: rms(x, w, 1e-5), eps=1e-5)
    ref("norm.add_rms", lambda s=_s: (R(*s), R(*s), R(s[-1])), lambda x, r, w: (rms(x + r, w), x + r))
    ref("mlp.swiglu", lambda s=_s: (R(*s), R(9, s[-1]), R(9, s[-1]), R(s[-1], 9)), swiglu)
    ref("mtp.branch", lambda s=_s: (R(*s), R(*s), R(s[-1]), R(s[-1]), R(s[-1], 2 * s[-1])),
        lambda h, e, en, hn, w: torch.cat([rms(e, en), rms(h, hn)], -1) @ w.T)


def dequant_loop(w, s, block):
    out = w.float().clone()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= s[i, j]
    return out


for _n, _k, _blk in [(20, 12, (8, 8)), (16, 16, (8, 4)), (5, 130, (128, 128))]:
    _mk = lambda n=_n, k=_k, blk=_blk: (R(n, k).to(torch.float8_e4m3fn),
                                       torch.rand(-(-n // blk[0]), -(-k // blk[1]), generator=G) + 0.5)
    ref("dequant_fp8", _mk, lambda w, s, blk=_blk: dequant_loop(w, s, blk), block=_blk)
    ref("linear_fp8", lambda mk=_mk, k=_k: (R(3, k),) + mk(),
        lambda x, w, s, blk=_blk: x @ dequant_loop(w, s, blk).T, block=_blk)

# ---------------------------------------------------------------- RoPE
def hf_inv_freq(d, attrs):
    """inv_freq and cos/sin factor from Hugging Face's RoPE init functions (an independent implementation)."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    kind = attrs.get("scaling", "none")
    theta = attrs.get("theta", 10000.0)
    if kind == "none":
        return 1.0 / theta ** (torch.arange(0, d, 2).float() / d), 1.0
    params = {"rope_type": kind, "rope_theta": theta, "factor": attrs["factor"]}
    orig = attrs.get("original_max_position_embeddings")
    params.update({k: attrs[k] for k in ("original_max_position_embeddings", "mscale", "mscale_all_dim",
                                         "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor")
                   if k in attrs})
    if kind == "llama3":
        params.setdefault("low_freq_factor", 1.0)
        params.setdefault("high_freq_factor", 4.0)
    cfg = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, head_dim=d, rope_parameters=params,
                      max_position_embeddings=int((orig or 4096) * attrs["factor"]))
    inv, factor = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    return inv.float(), factor


def rope_complex(x, pos, attrs):
    """DeepSeek's layout as complex multiplication (interleaved) or HF's rotate_half (half-split)."""
    d = x.shape[-1]
    inv, mult = hf_inv_freq(d, attrs)
    ang = pos.double()[..., None] * inv.double()
    ang = ang.reshape(ang.shape[:2] + (1,) * (x.dim() - 3) + (d // 2,))
    if attrs.get("interleaved"):
        z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
        return torch.view_as_real(z * torch.polar(torch.full_like(ang, mult), ang)).flatten(-2)
    cos, sin = torch.cat([ang.cos()] * 2, -1) * mult, torch.cat([ang.sin()] * 2, -1) * mult
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1).double()
    return x.double() * cos + rot * sin


ROPES = [{}, {"scaling": "linear", "factor": 4.0},
         {"scaling": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "mscale": 1.0,
          "mscale_all_dim": 0.7, "beta_fast": 32.0, "beta_slow": 1.0},
         {"scaling": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "mscale": 0.0},
         {"scaling": "llama3", "factor": 8.0, "original_max_position_embeddings": 32, "theta": 500000.0}]
for _a in ROPES:
    for _il in (False, True):
        for _s in [(2, 5, 3, 16), (1, 7, 10)]:
            ref("rope", lambda s=_s: (R(*s), torch.randint(0, 3000, s[:2], generator=G)),
                lambda x, p, a=dict(_a, interleaved=_il): rope_complex(x, p, a), **_a, interleaved=_il)


# ---------------------------------------------------------------- attention
def attention_loop(q, k, v, scale, causal=True):
    b, s, hq, _ = q.shape
    t, hkv = k.shape[1], k.shape[2]
    out = torch.zeros(b, s, hq, v.shape[-1])
    for bi in range(b):
        for h in range(hq):
            kh, vh = k[bi, :, h // (hq // hkv)], v[bi, :, h // (hq // hkv)]
            sc = q[bi, :, h] @ kh.T * scale
            if causal:
                allowed = torch.tensor([[j <= i + t - s for j in range(t)] for i in range(s)])
                sc = sc.masked_fill(~allowed, -math.inf)
            out[bi, :, h] = torch.softmax(sc, -1) @ vh
    return out


for _hq, _hkv, _c in [(4, 2, True), (3, 3, False), (5, 1, True)]:
    ref("attention.gqa", lambda hq=_hq, hkv=_hkv: (R(2, 3, hq, 8), R(2, 5, hkv, 8), R(2, 5, hkv, 6)),
        lambda q, k, v, c=_c: attention_loop(q, k, v, 0.3, c), scale=0.3, causal=_c)
for _s, _t in [(3, 3), (1, 6)]:
    ref("attention.mla", lambda s=_s, t=_t: (R(2, s, 4, 12), R(2, t, 4, 12), R(2, t, 4, 7)),
        lambda q, k, v: attention_loop(q, k, v, 0.25), scale=0.25)
    ref("attention.mla_absorbed", lambda s=_s, t=_t: (R(2, s, 3, 10 + 4), R(2, t, 10 + 4)),
        lambda q, c: attention_loop(q, c[:, :, None], c[:, :, None, :10], 0.2), scale=0.2, kv_lora_rank=10)


def rope_tail(q, pos, n, attrs):
    """q with its last n dims rotated (the independent complex/rotate_half RoPE above)."""
    return torch.cat([q[..., :-n].double(), rope_complex(q[..., -n:], pos, attrs)], -1).float()


_YARN = ROPES[2]
ref("attention.with_rope", lambda: (R(2, 3, 4, 8), torch.tensor([[5, 6, 7], [0, 1, 2]]), R(2, 6, 2, 8), R(2, 6, 2, 6)),
    lambda q, p, k, v: attention_loop(rope_tail(q, p, 8, {}), k, v, 0.3), inner="attention.gqa", rope_dims=8,
    scale=0.3)
ref("attention.with_rope", lambda: (R(2, 2, 4, 12), torch.tensor([[3, 4], [9, 10]]), R(2, 5, 4, 12), R(2, 5, 4, 7)),
    lambda q, p, k, v: attention_loop(rope_tail(q, p, 4, dict(_YARN, interleaved=True)), k, v, 0.25),
    inner="attention.mla", rope_dims=4, scale=0.25, interleaved=True, **_YARN)
ref("attention.with_rope", lambda: (R(2, 1, 3, 14), torch.tensor([[6], [2]]), R(2, 7, 14)),
    lambda q, p, c: attention_loop(rope_tail(q, p, 4, {"interleaved": True}), c[:, :, None], c[:, :, None, :10],
                                   0.2), inner="attention.mla_absorbed", rope_dims=4, scale=0.2, kv_lora_rank=10,
    interleaved=True)
ref("cache.append", lambda: (R(2, 4, 3, 5), R(2, 1, 3, 5)),
    lambda c, n: torch.stack([torch.cat([c[i], n[i]]) for i in range(2)]))
ref("cache.append", lambda: (R(1, 0, 7), R(1, 3, 7)), lambda c, n: n.clone())
ref("mla.latent_proj", lambda: (R(2, 3, 16), R(12 + 4, 16), R(12)),
    lambda x, w, nw: (rms((x @ w.T)[..., :12], nw), (x @ w.T)[..., 12:]), kv_lora_rank=12)
ref("mla.latent_row", lambda: (R(2, 3, 12), R(2, 3, 8), R(12), torch.tensor([[4, 5, 6], [0, 1, 2]])),
    lambda c, k, nw, p: torch.cat([rms(c, nw), rope_complex(k[:, :, None], p, dict(_YARN, interleaved=True))[:, :, 0]
                                   .float()], -1), interleaved=True, **_YARN)
ref("mla.query_absorbed", lambda: (R(2, 1, 3, 6), R(2, 1, 3, 4), R(3, 6, 10), torch.tensor([[7], [2]])),
    lambda qn, qp, w, p: torch.cat([torch.stack([qn[:, :, h] @ w[h] for h in range(3)], 2),
                                    rope_complex(qp, p, {}).float()], -1))


def decompress_loop(c, k_pe, w, h, dn, dv):
    ks, vs = [], []
    for i in range(h):
        wi = w[i * (dn + dv):(i + 1) * (dn + dv)]
        kv = c @ wi.T
        ks.append(torch.cat([kv[..., :dn], k_pe[:, :, 0]], -1))
        vs.append(kv[..., dn:])
    return torch.stack(ks, 2), torch.stack(vs, 2)


ref("mla.decompress", lambda: (R(2, 3, 12), R(2, 3, 1, 4), R(3 * (6 + 5), 12)),
    lambda c, kp, w: decompress_loop(c, kp, w, 3, 6, 5), num_heads=3, qk_nope_dim=6, v_dim=5)


# ---------------------------------------------------------------- vision (DeepSeek-VL, Janus)
def patch_loop(x, w, bias):
    """Each patch as a dot product with the flattened kernel, written out per patch position."""
    p = w.shape[-1]
    rows = []
    for i in range(x.shape[2] // p):
        for j in range(x.shape[3] // p):
            tile = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(x.shape[0], -1)
            rows.append(tile @ w.reshape(w.shape[0], -1).T + bias)
    return torch.stack(rows, 1)


def splice_loop(e, ids, f, token_id):
    out, k = e.clone(), 0
    for bi in range(ids.shape[0]):
        for si in range(ids.shape[1]):
            if ids[bi, si] == token_id and k < len(f):
                out[bi, si], k = f[k], k + 1
    return out


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


for _n, _h, _w, _p in [(1, 28, 28, 14), (2, 12, 20, 4), (3, 9, 6, 3)]:
    ref("vision.patch_embed", lambda a=(_n, _h, _w, _p): (R(a[0], 3, a[1], a[2]), R(5, 3, a[3], a[3]), R(5)),
        patch_loop)
for _approx in ("none", "tanh"):
    ref("mlp.gelu", lambda: (R(2, 3, 6), R(9, 6), R(9), R(4, 9), R(4)),
        lambda x, w1, b1, w2, b2, a=_approx: (gelu_tanh(x @ w1.T + b1) if a == "tanh" else
                                              torch.nn.functional.gelu(x @ w1.T + b1)) @ w2.T + b2,
        approximate=_approx)
ref("norm.group", lambda: (R(2, 6, 3, 4), R(6), R(6)),
    lambda x, w, b: torch.stack([((g - g.mean()) / torch.sqrt(g.var(unbiased=False) + 1e-6))
                                 for g in x.reshape(4, -1)]).reshape(2, 6, 3, 4) * w[:, None, None] + b[:, None, None],
    groups=2)
_SPLICE_IDS = torch.tensor([[1, 7, 7, 2, 7], [7, 3, 4, 7, 7]])
ref("vision.splice", lambda: (R(2, 5, 6), _SPLICE_IDS, R(6, 6)), lambda e, i, f: splice_loop(e, i, f, 7), token_id=7)
ref("vision.splice", lambda: (R(2, 5, 6), _SPLICE_IDS, R(0, 6)), lambda e, i, f: e, token_id=7)   # decode: none
ref("vision.splice", lambda: (R(2, 5, 6), _SPLICE_IDS, R(4, 6)), lambda e, i, f: splice_loop(e, i, f, 7), token_id=7)



def resize_loop(x, height, width):
    """Bilinear, align_corners=False: each output pixel from its four neighbours, source index clamped at 0."""
    n, c, h, w = x.shape
    out = torch.zeros(n, c, height, width)

    def src(i, n_in, n_out):
        s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(s), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), s - i0
    for oy in range(height):
        y0, y1, fy = src(oy, h, height)
        for ox in range(width):
            x0, x1, fx = src(ox, w, width)
            out[..., oy, ox] = ((1 - fy) * ((1 - fx) * x[..., y0, x0] + fx * x[..., y0, x1])
                                + fy * ((1 - fx) * x[..., y1, x0] + fx * x[..., y1, x1]))
    return out


def window_loop(x, window):
    n, h, w, c = x.shape
    gh, gw = -(-h // window), -(-w // window)
    padded = torch.zeros(n, gh * window, gw * window, c)
    padded[:, :h, :w] = x
    return torch.stack([padded[i, a * window:(a + 1) * window, b * window:(b + 1) * window]
                        for i in range(n) for a in range(gh) for b in range(gw)])


def rel_pos_loop(q, k, v, rh, rw, scale):
    """Per query position: logits over every key position with its row and column offset embeddings."""
    t, gw = q.shape[1], rw.shape[0]
    out = torch.zeros_like(q)
    for qi in range(t):
        qy, qx = divmod(qi, gw)
        logits = torch.stack([scale * (q[:, qi] * k[:, ki]).sum(-1) + (q[:, qi] * rh[qy, ki // gw]).sum(-1)
                              + (q[:, qi] * rw[qx, ki % gw]).sum(-1) for ki in range(t)], -1)   # [n, heads, t]
        out[:, qi] = torch.einsum("nht,nthd->nhd", torch.softmax(logits, -1), v)
    return out


for _hw, _size in [((4, 4), (8, 8)), ((5, 3), (2, 7))]:   # up and down, both axes
    ref("vision.resize", lambda a=_hw: (R(2, 3, *a),), lambda x, s=_size: resize_loop(x, *s),
        height=_size[0], width=_size[1])
for _hw, _w in [((4, 4), 2), ((4, 5), 3)]:   # exact windows; zero padding on both sides
    ref("vision.window_partition", lambda a=_hw: (R(2, *a, 3),), lambda x, w=_w: window_loop(x, w), window=_w)
ref("attention.rel_pos", lambda: (R(2, 6, 2, 4), R(2, 6, 2, 4), R(2, 6, 2, 4), R(2, 2, 4), R(3, 3, 4)),
    lambda *a: rel_pos_loop(*a, 0.5), scale=0.5)


def shuffle_loop(x, r):
    """DeepSeek-VL2's downsampling spelled out: token (by, bx) of the padded grid concatenates, channel by channel,
    the r x r block's tokens in row-major order (zeros past the grid's edge)."""
    n, t, c = x.shape
    g = int(t ** 0.5)
    k = -(-g // r)
    out = torch.zeros(n, k * k, c * r * r)
    for by in range(k):
        for bx in range(k):
            for ch in range(c):
                for dy in range(r):
                    for dx in range(r):
                        y, xx = by * r + dy, bx * r + dx
                        if y < g and xx < g:
                            out[:, by * k + bx, ch * r * r + dy * r + dx] = x[:, y * g + xx, ch]
    return out


for _g in (3, 4):   # a padded grid (SO400M's 27 -> 28) and an exact one
    ref("vision.pixel_shuffle", lambda g=_g: (R(2, g * g, 3),), lambda x: shuffle_loop(x, 2), ratio=2)

# ---------------------------------------------------------------- DeepSeek Sparse Attention (V3.2)
for _s in [(3, 16), (2, 5, 7)]:
    ref("norm.layer", lambda s=_s: (R(*s), R(s[-1]), R(s[-1])), lambda x, w, b: layer_norm_loop(x, w, b, 1e-6))
for _s, _t in [(3, 3), (1, 6), (4, 9)]:
    ref("indexer.logits", lambda s=_s, t=_t: (R(2, s, 3, 8), R(2, t, 8), R(2, s, 3)),
        lambda q, k, w: indexer_logits_loop(q, k, w, 0.25, causal=False), scale=0.25, causal=False)
    ref("indexer.logits", lambda s=_s, t=_t: (R(2, s, 3, 16), R(2, t, 16), R(2, s, 3)),   # DeepSeek's FP8 numerics
        lambda q, k, w: indexer_logits_loop(rotate_quant_loop(q), rotate_quant_loop(k), w, 0.25, causal=False),
        scale=0.25, causal=False, fp8=True)
ref("indexer.quant_fp8", lambda: (R(2, 3, 16),), rotate_quant_parts_loop)
ref("indexer.quant_fp8", lambda: (R(2, 256) * 3,), rotate_quant_parts_loop)          # two groups of 128
ref("indexer.logits_fp8", lambda: (R(2, 2, 3, 16), *rotate_quant_parts_loop(R(2, 5, 16)), R(2, 2, 3)),
    lambda q, k, ks, w: indexer_logits_loop(rotate_quant_loop(q), k.float() * ks, w, 0.25, causal=False),
    scale=0.25, causal=False)
for _t, _k in [(3, 5), (6, 2), (9, 4)]:        # T below and above k
    ref("indexer.topk", lambda t=_t: (indexer_logits_loop(R(2, 3, 2, 4), R(2, t, 4), R(2, 3, 2), 1.0),),
        lambda x, k=_k: topk_loop(x, k), k=_k)
for _s, _t, _k in [(3, 3, 2), (1, 7, 3), (4, 9, 12)]:
    ref("attention.mla_sparse", lambda s=_s, t=_t, k=_k: (R(2, s, 3, 10), R(2, t, 3, 10), R(2, t, 3, 6),
                                                           causal_topk_indices(2, s, t, k, G)),
        lambda q, k, v, i: sparse_attention_loop(q, k, v, i, 0.3), scale=0.3)
    ref("attention.mla_sparse_absorbed", lambda s=_s, t=_t, k=_k: (R(2, s, 4, 12), R(2, t, 12),
                                                                    causal_topk_indices(2, s, t, k, G)),
        lambda q, c, i: sparse_attention_loop(q, c[:, :, None], c[:, :, None, :9], i, 0.3), scale=0.3,
        kv_lora_rank=9)


for _s, _g in [((3, 16), 8), ((2, 5, 12), 12)]:
    ref("kv.quant_fp8", lambda s=_s: (R(*s),), lambda x, g=_g: quant_fp8_loop(x, g), group=_g)
    ref("kv.dequant_fp8", lambda s=_s, g=_g: quant_fp8_loop(R(*s), g),
        lambda q, sc, g=_g: q.float() * sc.repeat_interleave(g, -1), group=_g)


ref("attention.with_rope", lambda: (R(2, 3, 3, 14), torch.tensor([[4, 5, 6], [0, 1, 2]]), R(2, 7, 14),
                                    causal_topk_indices(2, 3, 7, 3, G)),
    lambda q, p, c, i: sparse_attention_loop(rope_tail(q, p, 4, {"interleaved": True}), c[:, :, None],
                                             c[:, :, None, :10], i, 0.2),
    inner="attention.mla_sparse_absorbed", rope_dims=4, scale=0.2, kv_lora_rank=10, interleaved=True)


# ---------------------------------------------------------------- MoE
def route_loop(logits, bias=None, *, top_k, scoring="softmax", method="greedy", n_group=1, topk_group=1,
               norm_topk_prob=False, routed_scaling_factor=1.0):
    """Token by token, in plain Python lists, as the DeepSeek papers describe routing."""
    ws, ids = [], []
    for row in logits.tolist():
        sc = torch.softmax(torch.tensor(row), 0).tolist() if scoring == "softmax" else \
            [1 / (1 + math.exp(-v)) for v in row]
        ch = [s + (bias[j].item() if bias is not None else 0.0) for j, s in enumerate(sc)]
        if method != "greedy":
            per = len(ch) // n_group
            groups = [ch[g * per:(g + 1) * per] for g in range(n_group)]
            gs = [max(gr) if method == "group_limited" else sum(sorted(gr)[-2:]) for gr in groups]
            keep = sorted(range(n_group), key=lambda g: -gs[g])[:topk_group]
            ch = [v if j // per in keep else -math.inf for j, v in enumerate(ch)]
        top = sorted(range(len(ch)), key=lambda j: -ch[j])[:top_k]
        w = [sc[j] for j in top]
        if norm_topk_prob and top_k > 1:
            w = [v / (sum(w) + 1e-20) for v in w]
        ws.append([v * routed_scaling_factor for v in w])
        ids.append(top)
    return torch.tensor(ws), torch.tensor(ids)


ROUTES = [dict(top_k=2), dict(top_k=3, norm_topk_prob=True, routed_scaling_factor=1.5),
          dict(top_k=2, method="group_limited", n_group=4, topk_group=2, routed_scaling_factor=16.0),
          dict(top_k=3, scoring="sigmoid", method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
               routed_scaling_factor=2.5),
          dict(top_k=8, scoring="sigmoid")]
for _r in ROUTES:
    _b = (lambda: (R(8, scale=0.5),)) if _r.get("method") == "noaux_tc" else (lambda: ())
    for _n in (1, 6):
        ref("moe.route", lambda n=_n, b=_b: (R(n, 8),) + b(), lambda lg, *b, r=_r: route_loop(lg, *b, **r), **_r)
        ref("moe.gate", lambda n=_n, b=_b: (R(n, 16), R(8, 16)) + b(),
            lambda x, w, *b, r=_r: route_loop(x @ w.T, *b, **r), **_r)


def experts_inputs(n, k, e, pattern, d=8, i=6):
    if pattern == "one":
        idx = torch.tensor([[1] + list(range(2, k + 1))] * n)  # expert 1 gets every token, expert 0 none
    else:
        idx = torch.stack([torch.randperm(e, generator=G)[:k] for _ in range(n)])
    ws = [R(*s, scale=0.3) for _ in range(e) for s in ((i, d), (i, d), (d, i))]
    return (R(n, d), torch.rand(n, k, generator=G), idx, *ws)


def experts_loop(x, w, idx, *ws):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(idx[t].tolist()):
            out[t] += w[t, j] * swiglu(x[t:t + 1], *ws[3 * e: 3 * e + 3])[0]
    return out


for _n, _k, _e, _p in [(7, 2, 4, "random"), (5, 3, 4, "one"), (3, 4, 4, "random"), (1, 2, 5, "random")]:
    ref("moe.experts", lambda a=(_n, _k, _e, _p): experts_inputs(*a), experts_loop, num_experts=_e)


def permute_loop(x, idx, e):
    k = idx.shape[1]
    slots = sorted(range(idx.numel()), key=lambda f: (idx.flatten()[f].item(), f))
    counts = [sum(1 for v in idx.flatten().tolist() if v == j) for j in range(e)]
    offs = [0]
    for c in counts:
        offs.append(offs[-1] + c)
    return x[[f // k for f in slots]], torch.tensor(slots), torch.tensor(offs)


def grouped_loop(x, w, offs):
    out = torch.zeros(x.shape[0], w.shape[1])
    for e in range(w.shape[0]):
        for r in range(offs[e], offs[e + 1]):
            out[r] = w[e] @ x[r]
    return out


def unpermute_loop(y, w, order):
    k = w.shape[1]
    out = torch.zeros(w.shape[0], y.shape[1])
    for i, f in enumerate(order.tolist()):
        out[f // k] += y[i] * w.flatten()[f]
    return out


for _n, _k, _e, _p in [(6, 2, 5, "random"), (4, 3, 4, "one"), (1, 2, 3, "random"), (3, 4, 4, "random")]:
    ref("moe.permute", lambda a=(_n, _k, _e, _p): experts_inputs(*a)[:3:2],
        lambda x, i, e=_e: permute_loop(x, i, e), num_experts=_e)
ref("moe.grouped_gemm", lambda: (R(9, 8), R(4, 5, 8), torch.tensor([0, 3, 3, 8, 9])), grouped_loop)
ref("moe.grouped_gemm", lambda: (R(4, 3), R(2, 6, 3), torch.tensor([0, 0, 4])), grouped_loop)
ref("moe.unpermute", lambda: (R(8, 5), torch.rand(4, 2, generator=G), torch.randperm(8, generator=G)),
    unpermute_loop)

add_reference_cases(ref)   # DeepSeek-V4's ops (tests/v4_loops.py)


@pytest.mark.parametrize("op,make,want,attrs,tol", REF)
def test_reference(op, make, want, attrs, tol):
    tensors = make()
    got, exp = one_node(op, list(tensors), **attrs), want(*tensors)
    for g, e in zip(got if isinstance(got, list) else [got], exp if isinstance(exp, tuple) else [exp]):
        assert_close(g, e, tol)


def test_every_domain_op_has_reference_and_shape_cases():
    domain = {op.name for op in all_ops("domain")}
    assert domain - COVERED == set()
    assert domain - {c[0] for c in GOOD} == set()
    assert domain - {c[0] for c in BAD} == set()


# ---------------------------------------------------------------- routing semantics, by construction
def logit(p):
    return math.log(p / (1 - p))


def route(logits, bias=None, **attrs):
    ins = [torch.tensor(logits, dtype=torch.float32)] + ([torch.tensor(bias)] if bias is not None else [])
    return one_node("moe.route", ins, **attrs)


def test_noaux_tc_group_score_is_sum_of_top2():
    """Group 0 has the single best expert (max wins), group 1 the best top-2 pair (noaux_tc wins),
    group 2 the best total of all four (a plain sum would win)."""
    p = [0.99, 0.01, 0.01, 0.01, 0.6, 0.6, 0.02, 0.02, 0.35, 0.35, 0.35, 0.35]
    row = [[logit(v) for v in p]]
    kw = dict(top_k=2, scoring="sigmoid", n_group=3, topk_group=1)
    _, idx = route(row, [0.0] * 12, method="noaux_tc", **kw)
    assert sorted(idx[0].tolist()) == [4, 5]
    _, idx = route(row, method="group_limited", **kw)
    assert idx[0, 0].item() == 0 and idx[0, 1].item() in (1, 2, 3)
    _, idx = route(row, method="greedy", top_k=2, scoring="sigmoid")
    assert idx[0].tolist() == [0, 4] or idx[0].tolist() == [0, 5]


def test_bias_chooses_but_does_not_weigh():
    row = [[logit(v) for v in (0.9, 0.8, 0.1, 0.2)]]
    bias = [0.0, 0.0, 1.0, 0.0]  # lifts expert 2 (score 0.1) above the others for selection
    w, idx = route(row, bias, top_k=2, scoring="sigmoid", method="noaux_tc", n_group=1, topk_group=1)
    assert idx[0].tolist() == [2, 0]
    assert torch.allclose(w[0], torch.tensor([0.1, 0.9]), atol=1e-6)


def test_norm_topk_prob_and_scaling():
    row = [[logit(v) for v in (0.9, 0.8, 0.1, 0.3)]]
    w, _ = route(row, top_k=2, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)
    assert torch.allclose(w[0], torch.tensor([0.9, 0.8]) / 1.7 * 2.5, atol=1e-6)
    w1, _ = route(row, top_k=1, scoring="sigmoid", norm_topk_prob=True)  # top-1 is never renormalised
    assert torch.allclose(w1[0], torch.tensor([0.9]), atol=1e-6)


def test_softmax_vs_sigmoid():
    lg = R(5, 6)
    w, idx = route(lg.tolist(), top_k=2, scoring="softmax")
    assert torch.allclose(w, torch.softmax(lg, -1).gather(1, idx), atol=1e-6)
    w, idx = route(lg.tolist(), top_k=2, scoring="sigmoid")
    assert torch.allclose(w, torch.sigmoid(lg).gather(1, idx), atol=1e-6)
    assert (idx == lg.topk(2).indices).all()  # both scorings are monotone: same experts


def test_top_k_equals_experts_and_single_token():
    lg = R(1, 6)
    w, idx = route(lg.tolist(), top_k=6, scoring="softmax", norm_topk_prob=True)
    assert sorted(idx[0].tolist()) == list(range(6))
    assert torch.allclose(w.sum(), torch.tensor(1.0), atol=1e-6)


def test_experts_with_no_tokens_and_one_expert_for_all():
    x, w, idx, *ws = experts_inputs(5, 1, 4, "one")
    out = one_node("moe.experts", [x, w, idx, *ws], num_experts=4)
    assert_close(out, w * swiglu(x, *ws[3:6]))  # only expert 1 ran; experts 0, 2, 3 had no tokens


# ---------------------------------------------------------------- shape rules
def T(*shape, dt="float32"):
    return TensorType(shape, dt)


F8, L = "float8_e4m3fn", "int64"
GOOD = [
    ("norm.rms", [T("B", "S", 8), T(8)], {}, [T("B", "S", 8)]),
    ("norm.add_rms", [T("B", "S", 8), T("B", "S", 8), T(8)], {}, [T("B", "S", 8)] * 2),
    ("mlp.swiglu", [T("N", 8), T(5, 8), T(5, 8), T(8, 5)], {}, [T("N", 8)]),
    ("mtp.branch", [T("B", "S", 8), T("B", "S", 8), T(8), T(8), T(8, 16)], {}, [T("B", "S", 8)]),
    ("linear_fp8", [T("B", 130, dt="bfloat16"), T(5, 130, dt=F8), T(1, 2)], {}, [T("B", 5, dt="bfloat16")]),
    ("dequant_fp8", [T(20, 12, dt=F8), T(3, 2)], {"block": (8, 8)}, [T(20, 12)]),
    ("rope", [T("B", "S", 4, 16), T("B", "S", dt=L)], {"scaling": "yarn"}, [T("B", "S", 4, 16)]),
    ("attention.gqa", [T("B", "S", 8, 16), T("B", "S+T", 2, 16), T("B", "S+T", 2, 8)], {"scale": 0.1},
     [T("B", "S", 8, 8)]),
    ("attention.mla", [T("B", "S", 4, 24), T("B", "T", 4, 24), T("B", "T", 4, 16)], {"scale": 0.1},
     [T("B", "S", 4, 16)]),
    ("attention.mla_absorbed", [T("B", "S", 4, 36), T("B", "T", 36)], {"scale": 0.1, "kv_lora_rank": 32},
     [T("B", "S", 4, 32)]),
    ("attention.with_rope", [T("B", "S", 4, 36), T("B", "S", dt=L), T("B", "T", 36)],
     {"inner": "attention.mla_absorbed", "rope_dims": 4, "scale": 0.1, "kv_lora_rank": 32}, [T("B", "S", 4, 32)]),
    ("attention.with_rope", [T("B", "S", 8, 16), T("B", "S", dt=L), T("B", "T", 2, 16), T("B", "T", 2, 8)],
     {"inner": "attention.gqa", "rope_dims": 16, "scale": 0.1}, [T("B", "S", 8, 8)]),
    ("norm.layer", [T("B", "S", 8), T(8), T(8)], {}, [T("B", "S", 8)]),
    ("vision.patch_embed", [T("N", 3, 28, 42), T(8, 3, 14, 14), T(8)], {}, [T("N", 6, 8)]),
    ("mlp.gelu", [T("N", 4, 8), T(16, 8), T(16), T(6, 16), T(6)], {"approximate": "tanh"}, [T("N", 4, 6)]),
    ("vision.splice", [T("B", "S", 8), T("B", "S", dt=L), T("I", 8)], {"token_id": 3}, [T("B", "S", 8)]),
    ("norm.group", [T("N", 64, 4, 4), T(64), T(64)], {"groups": 32}, [T("N", 64, 4, 4)]),
    ("vision.resize", [T("N", 16, 4, 4)], {"height": 8, "width": 6}, [T("N", 16, 8, 6)]),
    ("vision.window_partition", [T("N", 4, 5, 8)], {"window": 3}, [T("N*4", 3, 3, 8)]),
    ("vision.pixel_shuffle", [T("N", 729, 8)], {"ratio": 2}, [T("N", 196, 32)]),
    ("attention.rel_pos", [T("M", 6, 2, 4)] * 3 + [T(2, 2, 4), T(3, 3, 4)], {"scale": 0.5}, [T("M", 6, 2, 4)]),
    ("indexer.logits", [T("B", "S", 4, 16), T("B", "T", 16), T("B", "S", 4)], {"scale": 0.1}, [T("B", "S", "T")]),
    ("indexer.topk", [T("B", "S", "T")], {"k": 8}, [T("B", "S", 8, dt=L)]),
    ("indexer.quant_fp8", [T("B", "T", 256)], {}, [T("B", "T", 256, dt=F8), T("B", "T", 2)]),
    ("indexer.logits_fp8", [T("B", "S", 4, 16), T("B", "T", 16, dt=F8), T("B", "T", 1), T("B", "S", 4)],
     {"scale": 0.1}, [T("B", "S", "T")]),
    ("attention.mla_sparse", [T("B", "S", 4, 24), T("B", "T", 4, 24), T("B", "T", 4, 16), T("B", "S", 8, dt=L)],
     {"scale": 0.1}, [T("B", "S", 4, 16)]),
    ("attention.mla_sparse_absorbed", [T("B", "S", 4, 36), T("B", "T", 36), T("B", "S", 8, dt="int32")],
     {"scale": 0.1, "kv_lora_rank": 32}, [T("B", "S", 4, 32)]),
    ("kv.quant_fp8", [T("B", "S", 256)], {}, [T("B", "S", 256, dt=F8), T("B", "S", 2)]),
    ("kv.dequant_fp8", [T("B", "T", 32, dt=F8), T("B", "T", 1)], {"group": 32, "dtype": "bfloat16"},
     [T("B", "T", 32, dt="bfloat16")]),
    ("cache.append", [T("B", "T", 4, 8), T("B", "S", 4, 8)], {}, [T("B", "S+T", 4, 8)]),
    ("mla.latent_proj", [T("B", "S", 16), T(20, 16), T(16)], {"kv_lora_rank": 16}, [T("B", "S", 16), T("B", "S", 4)]),
    ("mla.latent_row", [T("B", "S", 16), T("B", "S", 4), T(16), T("B", "S", dt=L)], {}, [T("B", "S", 20)]),
    ("mla.query_absorbed", [T("B", "S", 2, 8), T("B", "S", 2, 4), T(2, 8, 16), T("B", "S", dt=L)], {},
     [T("B", "S", 2, 20)]),
    ("mla.decompress", [T("B", "S", 16), T("B", "S", 1, 4), T(2 * 14, 16)], {"num_heads": 2, "qk_nope_dim": 8,
                                                                              "v_dim": 6},
     [T("B", "S", 2, 12), T("B", "S", 2, 6)]),
    ("moe.route", [T("B*S", 8), T(8)], {"top_k": 2, "method": "noaux_tc", "n_group": 4, "topk_group": 2},
     [T("B*S", 2), T("B*S", 2, dt=L)]),
    ("moe.gate", [T("N", 16, dt="bfloat16"), T(8, 16, dt="bfloat16")], {"top_k": 3}, [T("N", 3), T("N", 3, dt=L)]),
    ("moe.experts", [T("N", 8), T("N", 2), T("N", 2, dt=L)] + [T(4, 8), T(4, 8), T(8, 4)] * 2, {"num_experts": 2},
     [T("N", 8)]),
    ("moe.permute", [T("N", 8), T("N", 2, dt=L)], {"num_experts": 4},
     [T("2*N", 8), T("2*N", dt=L), T(5, dt=L)]),
    ("moe.grouped_gemm", [T("M", 8), T(4, 6, 8), T(5, dt=L)], {}, [T("M", 6)]),
    ("moe.unpermute", [T("2*N", 8), T("N", 2), T("2*N", dt=L)], {}, [T("N", 8)]),
]
BAD = [
    ("norm.rms", [T(2, 8), T(7)], {}, r"weight must be \[8\], got float32\[7\]"),
    ("norm.rms", [T(2, 8, dt=L), T(8)], {}, r"must be a float tensor"),
    ("norm.add_rms", [T(2, 8), T(3, 8), T(8)], {}, r"x float32\[2, 8\] and residual float32\[3, 8\] differ"),
    ("mlp.swiglu", [T(2, 8), T(5, 8), T(5, 8), T(5, 8)], {}, r"down must be \[8, 5\]"),
    ("mtp.branch", [T(2, 8), T(2, 8), T(8), T(8), T(8, 8)], {}, r"eh_proj must be \[8, 2\*8\]"),
    ("linear_fp8", [T(2, 16), T(8, 16), T(1, 1)], {}, r"weight must be float8_e4m3fn"),
    ("linear_fp8", [T(2, 16), T(8, 16, dt=F8), T(2, 2)], {"block": (8, 8)}, r"scales must be \[1, 2\]"),
    ("dequant_fp8", [T(8, 16, dt=F8), T(1, 2, dt="bfloat16")], {"block": (8, 8)}, r"scales must be float32"),
    ("rope", [T(2, 3, 4, 7), T(2, 3, dt=L)], {}, r"must be even"),
    ("rope", [T(2, 3, 4, 8), T(3, 2, dt=L)], {}, r"positions must be \[B, S\]"),
    ("rope", [T(2, 3, 8), T(2, 3, dt=L)], {"scaling": "ntk"}, r"scaling='ntk' not in"),
    ("attention.gqa", [T(1, 2, 6, 8), T(1, 3, 4, 8), T(1, 3, 4, 8)], {"scale": 1.0}, r"not a multiple of 4"),
    ("attention.gqa", [T(1, 2, 4, 8), T(1, 3, 4, 9), T(1, 3, 4, 8)], {"scale": 1.0}, r"q and k head dims differ"),
    ("attention.gqa", [T(1, 2, 4, 8), T(1, 3, 4, 8), T(1, 3, 4, 8)], {}, r"missing required attribute 'scale'"),
    ("attention.mla", [T(1, 2, 4, 8), T(1, 3, 2, 8), T(1, 3, 2, 8)], {"scale": 1.0}, r"q has 4 heads, k 2"),
    ("attention.mla_absorbed", [T(1, 2, 4, 8), T(1, 3, 9)], {"scale": 1.0, "kv_lora_rank": 4}, r"widths differ"),
    ("attention.mla_absorbed", [T(1, 2, 4, 8), T(1, 3, 8)], {"scale": 1.0, "kv_lora_rank": 8}, r"must be below"),
    ("attention.with_rope", [T(1, 2, 4, 8), T(1, 2, dt=L), T(1, 3, 4, 8), T(1, 3, 4, 8)],
     {"inner": "attention.gqa", "rope_dims": 10, "scale": 1.0}, r"rope_dims=10 must be even and at most"),
    ("attention.with_rope", [T(1, 2, 4, 8), T(1, 2, dt=L), T(1, 3, 8)],
     {"inner": "attention.gqa", "rope_dims": 4, "scale": 1.0}, r"attention.gqa takes q k v"),
    ("attention.with_rope", [T(1, 2, 4, 8), T(2, 1, dt=L), T(1, 3, 4, 8), T(1, 3, 4, 8)],
     {"inner": "attention.mla", "rope_dims": 4, "scale": 1.0}, r"positions .* must be \[B, S\]"),
    ("attention.with_rope", [T(1, 2, 4, 8), T(1, 2, dt=L), T(1, 3, 4, 8), T(1, 3, 4, 8)],
     {"inner": "attention.flash", "rope_dims": 4, "scale": 1.0}, r"inner='attention.flash' not in"),
    ("norm.layer", [T(2, 8), T(8), T(7)], {}, r"weight and bias must be \[8\]"),
    ("vision.patch_embed", [T(1, 3, 30, 28), T(8, 3, 14, 14), T(8)], {}, r"30x28 is not a whole number of 14"),
    ("vision.patch_embed", [T(1, 1, 28, 28), T(8, 3, 14, 14), T(8)], {}, r"does not fit pixels"),
    ("mlp.gelu", [T(2, 8), T(16, 8), T(16), T(6, 15), T(6)], {}, r"fc2 .* must be \[O, 16\]"),
    ("vision.splice", [T(2, 4, 8), T(2, 4, dt=L), T(3, 7)], {"token_id": 3}, r"must be \[I, 8\]"),
    ("vision.splice", [T(2, 4, 8), T(2, 4), T(3, 8)], {"token_id": 3}, r"ids must be int64"),
    ("norm.group", [T(2, 12, 4, 4), T(12), T(12)], {"groups": 8}, r"12 channels .* do not split into 8 groups"),
    ("vision.resize", [T(2, 16, 4)], {"height": 8, "width": 6}, r"vision.resize x \[N, C, H, W\]"),
    ("vision.window_partition", [T(2, "H", 4, 8)], {"window": 2}, r"needs a static H, W"),
    ("vision.pixel_shuffle", [T(2, 12, 8)], {"ratio": 2}, r"static square grid of tokens"),
    ("attention.rel_pos", [T(1, 6, 2, 4)] * 3 + [T(3, 3, 4), T(3, 3, 4)], {"scale": 0.5}, r"must be \[N, 3\*3"),
    ("indexer.logits", [T(1, 2, 4, 8), T(1, 3, 9), T(1, 2, 4)], {"scale": 1.0}, r"differ in batch or head dim"),
    ("indexer.logits", [T(1, 2, 4, 8), T(1, 3, 8), T(1, 2, 3)], {"scale": 1.0}, r"must be \[B,S,H\]"),
    ("indexer.logits", [T(1, 2, 4, 12), T(1, 3, 12), T(1, 2, 4)], {"scale": 1.0, "fp8": True},
     r"fp8 needs a power-of-two head dim"),
    ("indexer.topk", [T(1, 2, 3, dt=L)], {"k": 2}, r"must be a float tensor"),
    ("indexer.quant_fp8", [T(2, 12)], {}, r"needs a power-of-two last dim"),
    ("indexer.logits_fp8", [T(1, 2, 4, 8), T(1, 3, 8), T(1, 3, 1), T(1, 2, 4)], {"scale": 1.0},
     r"keys must be float8_e4m3fn"),
    ("indexer.topk", [T(1, 2, 3)], {"k": 0}, r"k=0 must be positive"),
    ("attention.mla_sparse", [T(1, 2, 4, 8), T(1, 3, 4, 8), T(1, 3, 4, 8), T(1, 3, 2, dt=L)], {"scale": 1.0},
     r"must be \[B,S,K\] of q"),
    ("attention.mla_sparse_absorbed", [T(1, 2, 4, 8), T(1, 3, 8), T(1, 2, 2)], {"scale": 1.0, "kv_lora_rank": 4},
     r"must be int64 or int32"),
    ("kv.quant_fp8", [T(2, 96)], {}, r"row width 96 is not a multiple of group 128"),
    ("kv.dequant_fp8", [T(2, 32), T(2, 1)], {"group": 32}, r"rows must be float8_e4m3fn"),
    ("kv.dequant_fp8", [T(2, 32, dt=F8), T(2, 2)], {"group": 32}, r"scales must be float32 \[..., 1\]"),
    ("cache.append", [T(1, 3, 4), T(1, 3, 5)], {}, r"differ off the length dim"),
    ("mla.latent_proj", [T(2, 16), T(20, 16), T(8)], {"kv_lora_rank": 16}, r"norm weight must be \[16\]"),
    ("mla.latent_row", [T(1, 2, 16), T(1, 2, 4), T(8), T(1, 2, dt=L)], {}, r"c_kv .* disagree"),
    ("mla.query_absorbed", [T(1, 2, 2, 8), T(1, 2, 2, 4), T(2, 6, 16), T(1, 2, dt=L)], {}, r"w_uk .* disagree"),
    ("mla.decompress", [T(1, 2, 16), T(1, 2, 2, 4), T(28, 16)], {"num_heads": 2, "qk_nope_dim": 8, "v_dim": 6},
     r"k_pe .* vs c_kv"),
    ("moe.route", [T(4, 8)], {"top_k": 9}, r"top_k 9 must be in 1\.\.8"),
    ("moe.route", [T(4, 8)], {"top_k": 2, "method": "group_limited", "n_group": 3}, r"8 experts in 3 groups"),
    ("moe.route", [T(4, 8)], {"top_k": 5, "method": "group_limited", "n_group": 4, "topk_group": 2},
     r"hold fewer than top_k=5"),
    ("moe.route", [T(4, 8), T(7)], {"top_k": 2}, r"bias must be \[8\]"),
    ("moe.gate", [T(4, 16), T(8, 15)], {"top_k": 2}, r"weight must be \[E, 16\]"),
    ("moe.experts", [T(4, 8), T(4, 2), T(4, 2, dt=L), T(4, 8), T(4, 8)], {"num_experts": 1},
     r"2 weights for 1 experts"),
    ("moe.experts", [T(4, 8), T(4, 2), T(4, 2)] + [T(4, 8), T(4, 8), T(8, 4)], {"num_experts": 1},
     r"indices must be int64"),
    ("moe.permute", [T(4, 8), T(4, 2)], {"num_experts": 4}, r"indices must be int64 or int32"),
    ("moe.grouped_gemm", [T(6, 8), T(4, 6, 8), T(4, dt=L)], {}, r"offsets must be \[4\+1\]"),
    ("moe.unpermute", [T(8, 4), T(4, 2), T(7, dt=L)], {}, r"order int64\[7\] must match y rows"),
]
GOOD += V4_GOOD
BAD += V4_BAD


@pytest.mark.parametrize("op,ins,attrs,outs", GOOD, ids=[c[0] for c in GOOD])
def test_shape_rule_good(op, ins, attrs, outs):
    b = GraphBuilder()
    vals = [b.input(f"x{i}", t.shape, t.dtype) for i, t in enumerate(ins)]
    out = b.op(op, *vals, **attrs)
    assert [v.type for v in (out if isinstance(out, tuple) else (out,))] == outs


@pytest.mark.parametrize("op,ins,attrs,pattern", BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD)])
def test_shape_rule_bad(op, ins, attrs, pattern):
    b = GraphBuilder()
    vals = [b.input(f"x{i}", t.shape, t.dtype) for i, t in enumerate(ins)]
    with pytest.raises(ShapeError, match=pattern) as info:
        b.op(op, *vals, **attrs)
    assert f"while building {op}(" in str(info.value)
    assert f"%x0: {ins[0]}" in str(info.value)
