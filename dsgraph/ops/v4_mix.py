"""DeepSeek-V4 residual and FFN ops: manifold-constrained hyper-connections (mHC: mix with Sinkhorn, merge,
the final hyper-head), sqrtsoftplus and hash routing, SwiGLU with clamped pre-activations, MXFP4 dequant.

Semantics as transformers' `modeling_deepseek_v4.py` (`DeepseekV4HyperConnection`, `DeepseekV4HyperHead`,
`DeepseekV4TopKRouter`, `DeepseekV4HashRouter`, `DeepseekV4Experts._apply_gate`): the residual is N = hc_mult
streams [B,S,N,D]; hc.pre collapses them into a block input and yields the post / comb weights that hc.post
uses to expand the block output back (out = post * y + comb^T @ x). The mHC weights are computed in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..types import TensorType
from .common import expect_float, expect_int, expect_rank, f32, same_dtype
from .moe import moe_experts_ref
from .registry import Attr, defop, expect

HC_ATTRS = {"iters": Attr(int, 20), "eps": Attr(float, 1e-6), "norm_eps": Attr(float, 1e-6)}
HC_PRE = defop("hc.pre", "x fn base scale", HC_ATTRS,
               "mHC mix: x [B,S,N,D] -> (collapsed [B,S,D], post [B,S,N], comb [B,S,N,N]) from one fp32 projection "
               "fn [(2+N)N, N*D] of the unweighted-RMS-normed streams: pre = sigmoid(.)+eps collapses x, post = "
               "2*sigmoid(.), comb = Sinkhorn(softmax(.)+eps, iters) (doubly stochastic).", num_outputs=3,
               level="domain")


def _hc_types(x, fn, base, n_out, what):
    expect_rank(x, 4, f"{what} x [B,S,N,D]")
    expect_float(x, f"{what} x")
    n, d = x.shape[2], x.shape[3]
    expect(fn.shape == (n_out, n * d) and base.shape == (n_out,),
           lambda: f"{what}: fn must be [{n_out}, {n}*{d}] and base [{n_out}], got {fn} and {base}")


@HC_PRE.infer
def _(x, fn, base, scale, iters=20, eps=1e-6, norm_eps=1e-6):
    n = x.shape[2]
    _hc_types(x, fn, base, (2 + n) * n, "hc.pre")
    expect(scale.shape == (3,), f"hc.pre: scale must be [3], got {scale}")
    lead = x.shape[:2]
    return TensorType(lead + (x.shape[3],), x.dtype), TensorType(lead + (n,), "float32"), \
        TensorType(lead + (n, n), "float32")


def _hc_mixes(x, fn, norm_eps):
    flat = f32(x).flatten(2)
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    return F.linear(flat, f32(fn).to(flat.dtype))


def sinkhorn_ref(logits, iters: int, eps: float):
    """softmax(logits)+eps, one column normalisation, then iters-1 rounds of row and column normalisation."""
    comb = torch.softmax(logits, -1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


@HC_PRE.reference
def _(x, fn, base, scale, iters=20, eps=1e-6, norm_eps=1e-6):
    n = x.shape[2]
    pre_w, post_w, comb_w = _hc_mixes(x, fn, norm_eps).split((n, n, n * n), -1)
    pre_b, post_b, comb_b = f32(base).split((n, n, n * n))
    sp, so, sc = f32(scale).unbind(0)
    pre = torch.sigmoid(pre_w * sp + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * so + post_b)
    comb = sinkhorn_ref((comb_w * sc + comb_b).unflatten(-1, (n, n)), iters, eps)
    return (pre[..., None] * f32(x)).sum(2), post, comb


@HC_PRE.decomposition
def _(b, x, fn, base, scale, iters=20, eps=1e-6, norm_eps=1e-6):
    bs, s, n, d = x.shape
    mixes = _mixes_decomposed(b, x, fn, norm_eps)
    pre_w, post_w, comb_w = b.split(mixes, sizes=(n, n, n * n), dim=-1)
    pre_b, post_b, comb_b = b.split(b.cast(base, dtype="float32"), sizes=(n, n, n * n), dim=0)
    sp, so, sc = b.split(b.cast(scale, dtype="float32"), sizes=(1, 1, 1), dim=0)
    e = b.constant(value=eps)
    pre = b.add(b.sigmoid(b.add(b.mul(pre_w, sp), pre_b)), e)
    post = b.mul(b.sigmoid(b.add(b.mul(post_w, so), post_b)), b.constant(value=2.0))
    comb = b.add(b.softmax(b.reshape(b.add(b.mul(comb_w, sc), comb_b), shape=(bs, s, n, n)), dim=-1), e)
    comb = b.div(comb, b.add(b.sum(comb, dims=(-2,), keepdim=True), e))
    for _ in range(iters - 1):
        comb = b.div(comb, b.add(b.sum(comb, dims=(-1,), keepdim=True), e))
        comb = b.div(comb, b.add(b.sum(comb, dims=(-2,), keepdim=True), e))
    collapsed = b.sum(b.mul(b.reshape(pre, shape=(bs, s, n, 1)), b.cast(x, dtype="float32")), dims=(2,))
    return (collapsed if x.dtype == "float32" else b.cast(collapsed, dtype=x.dtype)), post, comb


def _mixes_decomposed(b, x, fn, norm_eps):
    bs, s, n, d = x.shape
    flat = b.reshape(b.cast(x, dtype="float32"), shape=(bs, s, n * d))
    ms = b.mean(b.mul(flat, flat), dims=(-1,), keepdim=True)
    return b.linear(b.mul(flat, b.rsqrt(b.add(ms, b.constant(value=norm_eps)))), b.cast(fn, dtype="float32"))


HC_POST = defop("hc.post", "x y post comb", {},
                "mHC merge: streams x [B,S,N,D], block output y [B,S,D], post [B,S,N], comb [B,S,N,N] -> "
                "[B,S,N,D] = post[n] * y + sum_j comb[j, n] * x[j].", level="domain")


@HC_POST.infer
def _(x, y, post, comb):
    expect_rank(x, 4, "hc.post x [B,S,N,D]")
    n = x.shape[2]
    expect(y.shape == x.shape[:2] + x.shape[3:] and post.shape == x.shape[:3] and comb.shape == x.shape[:3] + (n,),
           lambda: f"hc.post: y {y}, post {post}, comb {comb} do not fit streams {x}")
    same_dtype(x, y)
    return x


@HC_POST.reference
def _(x, y, post, comb):
    xf = f32(x)
    return f32(post)[..., None] * f32(y)[:, :, None] + torch.einsum("bsjn,bsjd->bsnd", f32(comb).to(xf.dtype), xf)


@HC_POST.decomposition
def _(b, x, y, post, comb):
    bs, s, n, d = x.shape
    cast = (lambda v: v) if x.dtype == "float32" else (lambda v: b.cast(v, dtype=x.dtype))
    expanded = b.mul(b.reshape(cast(post), shape=(bs, s, n, 1)), b.reshape(y, shape=(bs, s, 1, d)))
    return b.add(expanded, b.matmul(b.permute(cast(comb), dims=(0, 1, 3, 2)), x))


HC_HEAD = defop("hc.head", "x fn base scale", {"eps": Attr(float, 1e-6), "norm_eps": Attr(float, 1e-6)},
                "mHC hyper-head: x [B,S,N,D] -> [B,S,D] = sum_n (sigmoid(fn(rms(x)) * scale + base) + eps)_n x_n, "
                "the final collapse before the model norm.", level="domain")


@HC_HEAD.infer
def _(x, fn, base, scale, eps=1e-6, norm_eps=1e-6):
    _hc_types(x, fn, base, x.shape[2], "hc.head")
    expect(scale.shape == (1,), f"hc.head: scale must be [1], got {scale}")
    return TensorType(x.shape[:2] + (x.shape[3],), x.dtype)


@HC_HEAD.reference
def _(x, fn, base, scale, eps=1e-6, norm_eps=1e-6):
    pre = torch.sigmoid(_hc_mixes(x, fn, norm_eps) * f32(scale) + f32(base)) + eps
    return (pre[..., None] * f32(x)).sum(2)


@HC_HEAD.decomposition
def _(b, x, fn, base, scale, eps=1e-6, norm_eps=1e-6):
    bs, s, n, d = x.shape
    mixes = _mixes_decomposed(b, x, fn, norm_eps)
    pre = b.add(b.sigmoid(b.add(b.mul(mixes, b.cast(scale, dtype="float32")), b.cast(base, dtype="float32"))),
                b.constant(value=eps))
    out = b.sum(b.mul(b.reshape(pre, shape=(bs, s, n, 1)), b.cast(x, dtype="float32")), dims=(2,))
    return out if x.dtype == "float32" else b.cast(out, dtype=x.dtype)


# ---------------------------------------------------------------- routing
def _v4_gates(scores, idx, routed_scaling_factor):
    w = scores.gather(1, idx)
    return w / (w.sum(-1, keepdim=True) + 1e-20) * routed_scaling_factor, idx


def sqrtsoftplus(x):
    return F.softplus(f32(x)).sqrt()


ROUTE_SSP = defop("moe.route_sqrtsoftplus", "logits bias", {"top_k": Attr(int), "routed_scaling_factor":
                                                           Attr(float, 1.0)},
                  "V4 routing: scores = sqrt(softplus(logits [N,E])); top-k of scores + bias picks the experts; "
                  "gates = their unbiased scores renormalised (+1e-20) times routed_scaling_factor.", num_outputs=2,
                  level="domain")


@ROUTE_SSP.infer
def _(logits, bias, top_k, routed_scaling_factor=1.0):
    expect_rank(logits, 2, "moe.route_sqrtsoftplus logits [N,E]")
    e = logits.shape[1]
    expect(bias.shape == (e,) and 0 < top_k <= e, lambda: f"moe.route_sqrtsoftplus: bias {bias}, top_k {top_k}")
    return TensorType((logits.shape[0], top_k), "float32"), TensorType((logits.shape[0], top_k), "int64")


@ROUTE_SSP.reference
def _(logits, bias, top_k, routed_scaling_factor=1.0):
    scores = sqrtsoftplus(logits)
    return _v4_gates(scores, (scores + f32(bias)).topk(top_k, dim=-1).indices, routed_scaling_factor)


def _ssp_decomposed(b, logits):
    x = b.cast(logits, dtype="float32")
    big = b.gt(x, b.constant(value=20.0))
    soft = b.log(b.add(b.exp(b.minimum(x, b.constant(value=20.0))), b.constant(value=1.0)))
    return b.sqrt(b.where(big, x, soft))


def _gates_decomposed(b, scores, idx, routed_scaling_factor):
    w = b.gather(scores, idx, dim=1)
    w = b.div(w, b.add(b.sum(w, dims=(-1,), keepdim=True), b.constant(value=1e-20)))
    return b.mul(w, b.constant(value=routed_scaling_factor)), idx


@ROUTE_SSP.decomposition
def _(b, logits, bias, top_k, routed_scaling_factor=1.0):
    scores = _ssp_decomposed(b, logits)
    _, idx = b.topk(b.add(scores, b.cast(bias, dtype="float32")), k=top_k, dim=-1)
    return _gates_decomposed(b, scores, idx, routed_scaling_factor)


ROUTE_HASH = defop("moe.route_hash", "logits tid2eid ids", {"routed_scaling_factor": Attr(float, 1.0)},
                   "V4 hash routing: experts = tid2eid[ids] (a frozen [V,k] table, ids [N]); gates = their "
                   "sqrt(softplus(logits)) scores renormalised (+1e-20) times routed_scaling_factor.",
                   num_outputs=2, level="domain")


@ROUTE_HASH.infer
def _(logits, table, ids, routed_scaling_factor=1.0):
    expect_rank(logits, 2, "moe.route_hash logits [N,E]")
    expect_int(table, "moe.route_hash tid2eid")
    expect_int(ids, "moe.route_hash ids")
    expect(table.rank == 2 and ids.shape == (logits.shape[0],),
           lambda: f"moe.route_hash: tid2eid {table} must be [V,k] and ids {ids} [N] of logits {logits}")
    k = table.shape[1]
    return TensorType((logits.shape[0], k), "float32"), TensorType((logits.shape[0], k), "int64")


@ROUTE_HASH.reference
def _(logits, table, ids, routed_scaling_factor=1.0):
    return _v4_gates(sqrtsoftplus(logits), table[ids.long()].long(), routed_scaling_factor)


@ROUTE_HASH.decomposition
def _(b, logits, table, ids, routed_scaling_factor=1.0):
    idx = b.cast(b.index_select(table, ids, dim=0), dtype="int64")
    return _gates_decomposed(b, _ssp_decomposed(b, logits), idx, routed_scaling_factor)


# ---------------------------------------------------------------- clamped SwiGLU
def swiglu_clamped_ref(x, gate_w, up_w, down_w, *, limit):
    xf = f32(x)
    g = F.linear(xf, f32(gate_w)).clamp(max=limit)
    u = F.linear(xf, f32(up_w)).clamp(min=-limit, max=limit)
    return F.linear(f32((F.silu(g) * u).to(x.dtype)), f32(down_w))


SWIGLU_C = defop("mlp.swiglu_clamped", "x gate_weight up_weight down_weight", {"limit": Attr(float)},
                 "V4 SwiGLU: down(silu(min(gate(x), limit)) * clamp(up(x), -limit, limit)).", level="domain")


@SWIGLU_C.infer
def _(x, g, u, d, limit):
    expect(g.rank == 2 and g.shape[1] == x.shape[-1] and u.shape == g.shape and d.shape == (x.shape[-1], g.shape[0]),
           lambda: f"mlp.swiglu_clamped: gate {g} / up {u} / down {d} do not fit x {x}")
    same_dtype(x, g, u, d)
    return x


SWIGLU_C.reference(swiglu_clamped_ref)


def _clamped_decomposed(b, x, g, u, d, limit):
    hi, lo = b.constant(value=limit), b.constant(value=-limit)
    return b.linear(b.mul(b.silu(b.minimum(b.linear(x, g), hi)), b.maximum(b.minimum(b.linear(x, u), hi), lo)), d)


@SWIGLU_C.decomposition
def _(b, x, g, u, d, limit):
    return _clamped_decomposed(b, x, g, u, d, limit)


EXPERTS_C = defop("moe.experts_clamped", "x weights indices *expert_weights", {"num_experts": Attr(int),
                                                                              "limit": Attr(float)},
                  "moe.experts with V4's clamped SwiGLU per expert (mlp.swiglu_clamped).", level="domain")


@EXPERTS_C.infer
def _(x, weights, indices, *ws, num_experts, limit):
    expect_rank(x, 2, "moe.experts_clamped x [N, D]")
    expect_int(indices, "moe.experts_clamped indices")
    expect(weights.shape == indices.shape and len(ws) == 3 * num_experts,
           lambda: f"moe.experts_clamped: {len(ws)} weights for {num_experts} experts, gates {weights}")
    same_dtype(x, *ws)
    return x


@EXPERTS_C.reference
def _(x, weights, indices, *ws, num_experts, limit):
    return moe_experts_ref(x, weights, indices, *ws, num_experts=num_experts,
                           ffn=lambda t, g, u, d: swiglu_clamped_ref(t, g, u, d, limit=limit))


@EXPERTS_C.decomposition
def _(b, x, weights, indices, *ws, num_experts, limit):
    """Dense form, as moe.experts' decomposition: every expert on every token, weighted by its gate (0 if not)."""
    wf = b.cast(weights, dtype="float32")
    acc = None
    for e in range(num_experts):
        hit = b.eq(indices, b.constant(value=e, dtype=indices.dtype))
        gate = b.sum(b.where(hit, wf, b.constant(value=0.0)), dims=(-1,), keepdim=True)
        y = _clamped_decomposed(b, x, *ws[3 * e: 3 * e + 3], limit)
        term = b.mul(b.cast(y, dtype="float32"), gate)
        acc = term if acc is None else b.add(acc, term)
    return acc if x.dtype == "float32" else b.cast(acc, dtype=x.dtype)


ACT_C = defop("act.swiglu_clamped", "gate_up", {"limit": Attr(float)},
              "V4's clamped SwiGLU on a fused gate|up GEMM: silu(min(g, limit)) * clamp(u, -limit, limit) with g, u "
              "the halves of gate_up [.., 2I] (what group_moe emits for moe.experts_clamped).", level="domain")


@ACT_C.infer
def _(gu, limit):
    expect_float(gu, "act.swiglu_clamped input")
    i2 = gu.shape[-1]
    expect(isinstance(i2, int) and i2 % 2 == 0, lambda: f"act.swiglu_clamped: last dim of {gu} must be even")
    return TensorType(gu.shape[:-1] + (i2 // 2,), gu.dtype)


@ACT_C.reference
def _(gu, limit):
    g, u = f32(gu).chunk(2, dim=-1)
    return F.silu(g.clamp(max=limit)) * u.clamp(min=-limit, max=limit)


@ACT_C.decomposition
def _(b, gu, limit):
    half = gu.shape[-1] // 2
    g, u = b.split(gu, sizes=(half, half), dim=-1)
    hi, lo = b.constant(value=limit), b.constant(value=-limit)
    return b.mul(b.silu(b.minimum(g, hi)), b.maximum(b.minimum(u, hi), lo))


# ---------------------------------------------------------------- MXFP4
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32
DEQUANT_FP4 = defop("dequant_mxfp4", "weight scale", {"dtype": Attr(str, "float32")},
                    "MXFP4 weight [O, I/2] (int8/uint8: two e2m1 values a byte, low nibble first) with e8m0 scales "
                    "[O, I/32] (uint8 exponent byte: 2**(s-127)) -> [O, I] of dtype.", level="domain")


@DEQUANT_FP4.infer
def _(w, s, dtype="float32"):
    expect(w.dtype in ("int8", "uint8") and s.dtype == "uint8" and w.rank == 2 and s.rank == 2,
           lambda: f"dequant_mxfp4: want int8/uint8 weight [O, I/2] and uint8 scales [O, I/32], got {w}, {s}")
    i = w.shape[1] * 2
    expect(s.shape == (w.shape[0], i // MXFP4_BLOCK) and i % MXFP4_BLOCK == 0,
           lambda: f"dequant_mxfp4: scales {s} must be [{w.shape[0]}, {i}/{MXFP4_BLOCK}] for weight {w}")
    return TensorType((w.shape[0], i), dtype)


def unpack_e2m1(w):
    u = w.view(torch.uint8).long()
    lut = torch.tensor(E2M1, dtype=torch.float32, device=w.device)
    return torch.stack((lut[u & 0xF], lut[u >> 4]), -1).flatten(-2)


@DEQUANT_FP4.reference
def dequant_mxfp4_ref(w, s, dtype="float32"):
    scale = torch.exp2(s.float() - 127.0).repeat_interleave(MXFP4_BLOCK, dim=1)
    return unpack_e2m1(w) * scale
