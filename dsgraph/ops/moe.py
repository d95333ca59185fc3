"""DeepSeekMoE ops: routing (every DeepSeek variant), per-expert experts, and the
grouped form (permute by expert -> grouped GEMM -> weighted un-permute).

Routing variants, as the configs name them:
  scoring  softmax (DeepSeekMoE, V2) | sigmoid (V3/R1)
  method   greedy | group_limited (V2 `group_limited_greedy`: group score = max)
           | noaux_tc (V3: group score = sum of the group's top-2 biased scores)
  bias     V3's e_score_correction_bias: added for *choosing* experts only; gate values
           come from the unbiased scores. Masked-out groups are excluded with -inf
           (DeepSeek's inference code; HF's port fills 0.0, which differs only when a
           biased score is negative).
  norm_topk_prob (renormalise the k gates, +1e-20 as in HF), routed_scaling_factor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..types import TensorType
from .common import expect_float, expect_int, expect_rank, f32, same_dtype
from .registry import Attr, defop, expect

ROUTE_ATTRS = {
    "top_k": Attr(int),
    "scoring": Attr(str, "softmax", ("softmax", "sigmoid")),
    "method": Attr(str, "greedy", ("greedy", "group_limited", "noaux_tc")),
    "n_group": Attr(int, 1),
    "topk_group": Attr(int, 1),
    "norm_topk_prob": Attr(bool, False),
    "routed_scaling_factor": Attr(float, 1.0),
}


def route_ref(logits, bias=None, *, top_k, scoring, method, n_group, topk_group, norm_topk_prob,
              routed_scaling_factor):
    """logits [N, E] -> (gate weights [N, k] fp32, expert ids [N, k] int64)."""
    scores = f32(logits).softmax(-1) if scoring == "softmax" else f32(logits).sigmoid()
    choice = scores if bias is None else scores + f32(bias)
    n, e = choice.shape
    if method != "greedy":
        grouped = choice.view(n, n_group, e // n_group)
        group_score = grouped.amax(-1) if method == "group_limited" else grouped.topk(2, dim=-1).values.sum(-1)
        keep = group_score.topk(topk_group, dim=-1).indices
        mask = torch.zeros(n, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
        choice = choice.masked_fill(~mask.repeat_interleave(e // n_group, dim=1), float("-inf"))
    idx = choice.topk(top_k, dim=-1).indices
    w = scores.gather(1, idx)
    if top_k > 1 and norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * routed_scaling_factor, idx


def _route_types(logits, bias, top_k, method, n_group, topk_group):
    expect_rank(logits, 2, "moe routing logits [N, E]")
    expect_float(logits, "moe routing logits")
    e = logits.shape[1]
    expect(isinstance(e, int) and 0 < top_k <= e, f"moe routing: top_k {top_k} must be in 1..{e}")
    if bias is not None:
        expect(bias.shape == (e,), f"moe routing bias must be [{e}], got {bias}")
    if method != "greedy":
        expect(e % n_group == 0 and 0 < topk_group <= n_group,
               f"moe routing: {e} experts in {n_group} groups, topk_group {topk_group}")
        expect(topk_group * (e // n_group) >= top_k,
               f"moe routing: {topk_group} groups of {e // n_group} hold fewer than top_k={top_k} experts")
        if method == "noaux_tc":
            expect(e // n_group >= 2, "moe routing noaux_tc needs at least 2 experts per group")
    n = logits.shape[0]
    return TensorType((n, top_k), "float32"), TensorType((n, top_k), "int64")


ROUTE = defop("moe.route", "logits bias?", ROUTE_ATTRS,
              "Router scores -> top-k expert ids and gate weights (see module doc for the variants).",
              num_outputs=2, level="domain")


@ROUTE.infer
def _(logits, bias=None, **a):
    return _route_types(logits, bias, a["top_k"], a["method"], a["n_group"], a["topk_group"])


ROUTE.reference(route_ref)

GATE = defop("moe.gate", "x weight bias?", ROUTE_ATTRS,
             "Router GEMM fused with moe.route: route(x @ weight.T in fp32).", num_outputs=2, level="domain")


@GATE.infer
def _(x, w, bias=None, **a):
    expect_rank(x, 2, "moe.gate x [N, D]")
    expect(w.rank == 2 and w.shape[1] == x.shape[1], f"moe.gate weight must be [E, {x.shape[1]}], got {w}")
    return _route_types(TensorType((x.shape[0], w.shape[0]), "float32"), bias, a["top_k"], a["method"],
                        a["n_group"], a["topk_group"])


@GATE.reference
def _(x, w, bias=None, **a):
    return route_ref(F.linear(f32(x), f32(w)), bias, **a)


def swiglu_ref(x, gate_w, up_w, down_w):
    xf = f32(x)
    h = (F.silu(F.linear(xf, f32(gate_w))) * F.linear(xf, f32(up_w))).to(x.dtype)
    return F.linear(f32(h), f32(down_w))


EXPERTS = defop("moe.experts", "x weights indices *expert_weights", {"num_experts": Attr(int)},
                "Routed experts in per-expert form: expert_weights are (gate, up, down) for expert 0, 1, ...; "
                "out[t] = sum_k weights[t,k] * SwiGLU_{indices[t,k]}(x[t]).", level="domain")


@EXPERTS.infer
def _(x, weights, indices, *ws, num_experts):
    expect_rank(x, 2, "moe.experts x [N, D]")
    expect_rank(weights, 2, "moe.experts weights [N, k]")
    expect_int(indices, "moe.experts indices")
    expect(weights.shape == indices.shape and weights.shape[0] == x.shape[0],
           f"moe.experts: weights {weights} / indices {indices} / x {x} disagree")
    expect(len(ws) == 3 * num_experts, f"moe.experts: {len(ws)} weights for {num_experts} experts (need 3 each)")
    d = x.shape[1]
    for e in range(num_experts):
        g, u, dn = ws[3 * e: 3 * e + 3]
        expect(g.rank == 2 and g.shape[1] == d and u.shape == g.shape and dn.shape == (d, g.shape[0]),
               lambda: f"moe.experts: expert {e} weights gate {g}, up {u}, down {dn} do not fit D={d}")
        same_dtype(x, g, u, dn)
    return x


@EXPERTS.reference
def moe_experts_ref(x, weights, indices, *ws, num_experts, ffn=swiglu_ref):
    """The naive loop: count tokens per expert, skip idle experts, y[idx] += expert(x[idx]) * w (`ffn` the
    expert's FFN, V4 passes its clamped SwiGLU)."""
    y = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)  # >= fp32 sums
    counts = torch.bincount(indices.flatten(), minlength=num_experts).tolist()
    for e in range(num_experts):
        if counts[e] == 0:
            continue
        tok, slot = torch.where(indices == e)
        out = ffn(x[tok], *ws[3 * e: 3 * e + 3])
        y.index_add_(0, tok, out * weights[tok, slot, None].to(y.dtype))
    return y


PERMUTE = defop("moe.permute", "x indices", {"num_experts": Attr(int)},
                "Sort token copies by expert: x_perm [N*k, D] = x[order // k], order [N*k] (flat slot ids, "
                "stable by expert), offsets [E+1] (expert e owns rows offsets[e]:offsets[e+1]).",
                num_outputs=3, level="domain")


@PERMUTE.infer
def _(x, indices, num_experts):
    expect_rank(x, 2, "moe.permute x [N, D]")
    expect_rank(indices, 2, "moe.permute indices [N, k]")
    expect_int(indices, "moe.permute indices")
    m = indices.shape[0] * indices.shape[1]
    return (TensorType((m, x.shape[1]), x.dtype), TensorType((m,), "int64"),
            TensorType((num_experts + 1,), "int64"))


@PERMUTE.reference
def _(x, indices, num_experts):
    k = indices.shape[1]
    order = torch.argsort(indices.flatten(), stable=True)
    counts = torch.bincount(indices.flatten(), minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return x[order // k], order, offsets


GROUPED_GEMM = defop("moe.grouped_gemm", "x weight offsets", {},
                     "Grouped GEMM: rows offsets[e]:offsets[e+1] of x [M, K] times weight[e].T ([E, N, K]) -> [M, N].",
                     level="domain")


@GROUPED_GEMM.infer
def _(x, w, offsets):
    expect_rank(x, 2, "moe.grouped_gemm x [M, K]")
    expect_rank(w, 3, "moe.grouped_gemm weight [E, N, K]")
    expect(w.shape[2] == x.shape[1], f"moe.grouped_gemm: x {x} and weight {w} inner dims differ")
    expect(offsets.shape == (w.shape[0] + 1,), f"moe.grouped_gemm: offsets must be [{w.shape[0]}+1], got {offsets}")
    same_dtype(x, w)
    return TensorType((x.shape[0], w.shape[1]), x.dtype)


@GROUPED_GEMM.reference
def _(x, w, offsets):
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = F.linear(f32(x[lo:hi]), f32(w[e]))
    return out


UNPERMUTE = defop("moe.unpermute", "y weights order", {},
                  "Weighted un-permute: out[order[i] // k] += y[i] * weights.flat[order[i]] -> [N, D].",
                  level="domain")


@UNPERMUTE.infer
def _(y, weights, order):
    expect_rank(y, 2, "moe.unpermute y [N*k, D]")
    expect_rank(weights, 2, "moe.unpermute weights [N, k]")
    expect(order.shape == (y.shape[0],), f"moe.unpermute: order {order} must match y rows {y}")
    return TensorType((weights.shape[0], y.shape[1]), y.dtype)


@UNPERMUTE.reference
def _(y, weights, order):
    k = weights.shape[1]
    out = torch.zeros(weights.shape[0], y.shape[1], dtype=torch.float32, device=y.device)
    return out.index_add_(0, order // k, f32(y) * weights.flatten()[order, None].float())


# ---------------------------------------------------------------- decompositions
def _f32(b, v):
    return v if v.dtype == "float32" else b.cast(v, dtype="float32")


def _full(b, value, shape, dtype="float32"):
    """A constant of a (possibly symbolic) shape: a [1, ..] literal expanded."""
    return b.expand(b.constant(value=value, shape=(1,) * len(shape), dtype=dtype), shape=shape)


def route_decomposition(b, logits, bias=None, *, top_k, scoring, method, n_group, topk_group, norm_topk_prob,
                        routed_scaling_factor):
    """moe.route in primitives, step for step as `route_ref` (so ties break identically)."""
    lf = _f32(b, logits)
    scores = b.softmax(lf, dim=-1) if scoring == "softmax" else b.sigmoid(lf)
    choice = scores if bias is None else b.add(scores, _f32(b, bias))
    n, e = logits.shape
    if method != "greedy":
        grouped = b.reshape(choice, shape=(n, n_group, e // n_group))
        if method == "group_limited":
            group_score = b.amax(grouped, dims=(-1,))
        else:
            group_score = b.sum(b.topk(grouped, k=2, dim=-1)[0], dims=(-1,))
        keep = b.topk(group_score, k=topk_group, dim=-1)[1]
        mask = b.scatter(_full(b, 0, (n, n_group), "bool"), keep, _full(b, 1, (n, topk_group), "bool"), dim=1)
        mask = b.reshape(b.expand(b.reshape(mask, shape=(n, n_group, 1)), shape=(n, n_group, e // n_group)),
                         shape=(n, e))
        choice = b.where(mask, choice, b.constant(value=float("-inf")))
    idx = b.topk(choice, k=top_k, dim=-1)[1]
    w = b.gather(scores, idx, dim=1)
    if top_k > 1 and norm_topk_prob:
        w = b.div(w, b.add(b.sum(w, dims=(-1,), keepdim=True), b.constant(value=1e-20)))
    if routed_scaling_factor != 1.0:
        w = b.mul(w, b.constant(value=routed_scaling_factor))
    return w, idx


ROUTE.decomposition(route_decomposition)


@GATE.decomposition
def _(b, x, w, bias=None, **a):
    return route_decomposition(b, b.linear(_f32(b, x), _f32(b, w)), bias, **a)


def _token_of_slot(b, indices):
    """int64 [N*k]: the token each flat (token, slot) entry of indices [N, k] belongs to (= flat // k)."""
    n, k = indices.shape
    tok = b.reshape(b.arange_like(indices, dim=0), shape=(n, 1))
    return b.reshape(b.expand(tok, shape=(n, k)), shape=(n * k,))


@EXPERTS.decomposition
def _(b, x, weights, indices, *ws, num_experts):
    """Dense form: every expert runs on every token, weighted by that token's gate for it (0 if unrouted).

    Costs num_experts full FFNs, so it is meant for tiny models and for checking; the
    grouped form (moe.permute -> moe.grouped_gemm -> moe.unpermute) is the fast path.
    """
    wf = _f32(b, weights)
    zero = b.constant(value=0.0)
    acc = None
    for e in range(num_experts):
        g, u, dn = ws[3 * e: 3 * e + 3]
        hit = b.eq(indices, b.constant(value=e, dtype=indices.dtype))
        gate = b.sum(b.where(hit, wf, zero), dims=(-1,), keepdim=True)
        y = b.linear(b.mul(b.silu(b.linear(x, g)), b.linear(x, u)), dn)
        term = b.mul(_f32(b, y), gate)
        acc = term if acc is None else b.add(acc, term)
    return acc if x.dtype == "float32" else b.cast(acc, dtype=x.dtype)


@PERMUTE.decomposition
def _(b, x, indices, num_experts):
    n, k = indices.shape
    flat = b.reshape(indices, shape=(n * k,))
    order = b.argsort(flat, dim=0)
    x_perm = b.index_select(x, b.index_select(_token_of_slot(b, indices), order, dim=0), dim=0)
    counts = b.bincount(flat, length=num_experts)
    offsets = b.concat(b.constant(value=(0,), shape=(1,), dtype="int64"), b.cumsum(counts, dim=0), dim=0)
    return x_perm, order, offsets


@GROUPED_GEMM.decomposition
def _(b, x, w, offsets):
    """Row i belongs to expert #{e >= 1 : offsets[e] <= i}; gather that expert's matrix per row, one bmm."""
    m, kdim = x.shape
    e, ndim = w.shape[0], w.shape[1]
    offs = offsets if offsets.dtype == "int64" else b.cast(offsets, dtype="int64")
    ends = b.reshape(b.slice(offs, dim=0, start=1, end=e + 1), shape=(1, e))
    rows = b.reshape(b.arange_like(x, dim=0), shape=(m, 1))
    expert = b.sum(b.cast(b.le(ends, rows), dtype="int64"), dims=(-1,))
    w_rows = b.permute(b.index_select(w, expert, dim=0), dims=(0, 2, 1))
    out = b.matmul(b.reshape(x, shape=(m, 1, kdim)), w_rows)
    return b.reshape(out, shape=(m, ndim))


@UNPERMUTE.decomposition
def _(b, y, weights, order):
    m, d = y.shape
    n = weights.shape[0]
    tok = b.index_select(_token_of_slot(b, weights), order, dim=0)
    w_sel = b.index_select(b.reshape(_f32(b, weights), shape=(n * weights.shape[1],)), order, dim=0)
    contrib = b.mul(_f32(b, y), b.reshape(w_sel, shape=(m, 1)))
    out = b.index_add(_full(b, 0.0, (n, d)), tok, contrib, dim=0)
    return out if y.dtype == "float32" else b.cast(out, dtype=y.dtype)
