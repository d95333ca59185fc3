"""MoE routing as one TE function: Relax has no group-limited top-k with a selection-only bias.

Every DeepSeek variant (softmax | sigmoid scoring; greedy | group_limited | noaux_tc selection; V3's
e_score_correction_bias; top-k renormalisation; routed scaling) in the reference's order of steps. Top-k
over the few experts (E <= 256, k <= 8) is k rounds of an argmax that skips the already chosen
entries: it yields the values sorted descending, as torch.topk does, and breaks ties towards the lower
index.
"""
from __future__ import annotations

from ..deps import relax, te, tirx
from .linalg import linear
from .registry import TABLE, Lowered


def _neg_inf():
    return tirx.const(float("-inf"), "float32")


def _argmax_reducer():
    def combine(x, y):
        take_x = (x[1] > y[1]) | ((x[1] == y[1]) & (x[0] < y[0]))
        return tirx.Select(take_x, x[0], y[0]), tirx.Select(take_x, x[1], y[1])

    def identity(t0, t1):
        return tirx.const(-1, t0), tirx.const(float("-inf"), t1)

    return te.comm_reducer(combine, identity, name="argmax")


def _topk_rounds(values, n, width: int, k: int, name: str):
    """k argmax rounds over values(t, e) for e < width -> [index tensor per round]."""
    argmax = _argmax_reducer()
    chosen = []
    for j in range(k):
        chosen.append(_argmax_round(argmax, values, tuple(chosen), n, width, f"{name}_{j}"))
    return chosen


def _argmax_round(argmax, values, prev, n, width: int, name: str):
    """argmax over e < width of values(t, e), skipping the indices chosen in earlier rounds."""
    r = te.reduce_axis((0, width), name=f"{name}_r")

    def val(t, e):
        skip = tirx.const(False, "bool")
        for c in prev:
            skip = skip | (c[t] == e)
        return tirx.Select(skip, _neg_inf(), values(t, e))

    idx, _ = te.compute((n,), lambda t: argmax((r.var.astype("int64"), val(t, r)), axis=r), name=name)
    return idx


def route_te(logits, bias, *, top_k, scoring, method, n_group, topk_group, norm_topk_prob,
             routed_scaling_factor):
    """logits [N, E] (any float) -> (gate weights [N, k] fp32, expert ids [N, k] int64)."""
    n, e = logits.shape
    e = int(e)
    lf = te.compute((n, e), lambda t, i: logits[t, i].astype("float32"), name="logits_f32")
    if scoring == "softmax":
        r = te.reduce_axis((0, e), name="r_max")
        mx = te.compute((n,), lambda t: te.max(lf[t, r], axis=r), name="max")
        ex = te.compute((n, e), lambda t, i: tirx.exp(lf[t, i] - mx[t]), name="exp")
        r2 = te.reduce_axis((0, e), name="r_sum")
        den = te.compute((n,), lambda t: te.sum(ex[t, r2], axis=r2), name="den")
        scores = te.compute((n, e), lambda t, i: ex[t, i] / den[t], name="scores")
    else:
        scores = te.compute((n, e), lambda t, i: tirx.sigmoid(lf[t, i]), name="scores")
    if bias is None:
        choice = scores
    else:
        choice = te.compute((n, e), lambda t, i: scores[t, i] + bias[i].astype("float32"), name="choice")
    if method != "greedy":
        gs = e // n_group
        groups = _group_scores(choice, n, n_group, gs, method)
        keep = _topk_rounds(lambda t, g: groups[t, g], n, n_group, topk_group, "group")

        def masked(t, i):
            inside = tirx.const(False, "bool")
            for kg in keep:
                inside = inside | (kg[t] == i // gs)
            return tirx.Select(inside, choice[t, i], _neg_inf())

        choice = te.compute((n, e), masked, name="masked_choice")
    picked = _topk_rounds(lambda t, i: choice[t, i], n, e, top_k, "expert")
    ids = te.compute((n, top_k), lambda t, j: _pick(picked, j, t), name="ids")
    w = te.compute((n, top_k), lambda t, j: scores[t, ids[t, j]], name="gates")
    if top_k > 1 and norm_topk_prob:
        rk = te.reduce_axis((0, top_k), name="rk")
        tot = te.compute((n,), lambda t: te.sum(w[t, rk], axis=rk), name="gate_sum")
        w = te.compute((n, top_k), lambda t, j: w[t, j] / (tot[t] + tirx.const(1e-20, "float32")), name="gates_norm")
    scale = float(routed_scaling_factor)
    w = te.compute((n, top_k), lambda t, j: w[t, j] * scale, name="weights")
    return w, ids


def _pick(tensors, j, t):
    out = tensors[-1][t]
    for i in range(len(tensors) - 2, -1, -1):
        out = tirx.Select(j == i, tensors[i][t], out)
    return out


def _group_scores(choice, n, n_group: int, gs: int, method: str):
    """[N, n_group]: the group's max (group_limited) or the sum of its top two (noaux_tc)."""
    argmax = _argmax_reducer()
    r = te.reduce_axis((0, gs), name="g_r")
    first_i, first_v = te.compute((n, n_group), lambda t, g: argmax(
        (r.var.astype("int64"), choice[t, g * gs + r]), axis=r), name="group_top1")
    if method == "group_limited":
        return first_v
    r2 = te.reduce_axis((0, gs), name="g_r2")
    _, second_v = te.compute((n, n_group), lambda t, g: argmax(
        (r2.var.astype("int64"), tirx.Select(first_i[t, g] == r2, _neg_inf(), choice[t, g * gs + r2])), axis=r2),
        name="group_top2")
    return te.compute((n, n_group), lambda t, g: first_v[t, g] + second_v[t, g], name="group_score")


def _route_attrs(node):
    return {k: node.attrs[k] for k in ("top_k", "scoring", "method", "n_group", "topk_group", "norm_topk_prob",
                                        "routed_scaling_factor")}


def _describe(a) -> str:
    bias = ", bias" if a.get("bias") else ""
    return f"te.moe_route ({a['scoring']}, {a['method']}{bias}, top-{a['top_k']})"


@TABLE.register("moe.route")
def _(ctx, node):
    a = _route_attrs(node)
    logits, bias = (ctx.inputs(node) + [None])[:2]
    w, idx = _emit_route(ctx, logits, bias, a)
    return Lowered("tir", _describe({**a, "bias": bias is not None}), outputs=[w, idx])


@TABLE.register("moe.gate")
def _(ctx, node):
    a = _route_attrs(node)
    x, w, bias = (ctx.inputs(node) + [None])[:3]
    logits = linear(ctx, ctx.f32(x), ctx.f32(w), out_dtype="float32")
    gw, idx = _emit_route(ctx, logits, bias, a)
    return Lowered("tir", "te.nt_matmul + " + _describe({**a, "bias": bias is not None}), outputs=[gw, idx])


def _emit_route(ctx, logits, bias, a):
    if bias is None:
        out = ctx.emit_te(lambda lg: route_te(lg, None, **a), logits, name="moe_route")
    else:
        out = ctx.emit_te(lambda lg, b: route_te(lg, b, **a), logits, bias, name="moe_route")
    return ctx.emit(relax.TupleGetItem(out, 0)), ctx.emit(relax.TupleGetItem(out, 1))
