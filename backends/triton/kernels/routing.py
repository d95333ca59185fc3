"""MoE routing as one kernel (ops `moe.route` and `moe.gate`): scores, bias, group-limited top-k, renormalise,
scale — one program per token, the E scores held as a [groups x experts-per-group] register tile.

Semantics are `dsgraph.ops.moe.route_ref`: softmax or sigmoid scores (or V4's sqrt(softplus), op
`moe.route_sqrtsoftplus`, whose gates are always renormalised); the V3 correction bias only for choosing
experts (gates come from the unbiased scores); group_limited (group score = max) or noaux_tc (group score =
sum of the group's top-2 biased scores) keeps the best `topk_group` groups and masks the rest with -inf; the
top-k is taken by k rounds of argmax (ties go to the lower expert id), renormalised (+1e-20) and scaled.
`moe.gate` also computes the router logits x @ W^T in fp32 inside the same program (W rows streamed in
BLOCK_D chunks), so decode needs no separate router GEMM launch. That suits the interpreter; on a GPU one program
per token would stream all of W through one SM, so decode there computes the logits with `router_logits` (partial
sums over slices of D, spread over many programs, added up by `_route_kernel` as it loads them), and prefill with
cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsgraph.errors import ShapeError

from .common import check_device

_METHODS = {"greedy": 0, "group_limited": 1, "noaux_tc": 2}
_SCORINGS = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}


@triton.jit
def sqrt_softplus(x):
    """V4's expert score sqrt(softplus(x)), softplus as F.softplus computes it: x above 20, and exp(x) where
    log(1 + exp(x)) would round to 0."""
    return tl.sqrt(tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x)))))


@triton.jit
def _route_kernel(logits_ptr, x_ptr, gate_w_ptr, bias_ptr, w_out_ptr, id_out_ptr,
                  stride_l, stride_x, stride_gw, D, PARTS: tl.constexpr,
                  E: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_S: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, TOPK_GROUP: tl.constexpr,
                  SCORING: tl.constexpr, METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                  SCALE: tl.constexpr, FUSED_GATE: tl.constexpr, BLOCK_D: tl.constexpr, EXTRA: tl.constexpr,
                  BLOCK_X: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)[:, None]
    j = tl.arange(0, BLOCK_S)[None, :]
    expert = g * GS + j
    valid = (g < NG) & (j < GS)
    if FUSED_GATE:
        logit = tl.zeros((BLOCK_G, BLOCK_S), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            xv = tl.load(x_ptr + tok * stride_x + d, mask=d_ok, other=0.0).to(tl.float32)
            wv = tl.load(gate_w_ptr + expert[:, :, None] * stride_gw + d[None, None, :],
                         mask=valid[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
            logit += tl.sum(wv * xv[None, None, :], axis=2)
    else:
        logit = tl.zeros((BLOCK_G, BLOCK_S), dtype=tl.float32)
        for p in tl.static_range(PARTS):  # partial sums of the logits (router_logits), else PARTS == 1
            logit += tl.load(logits_ptr + tok * stride_l + p * E + expert, mask=valid, other=0.0).to(tl.float32)
    if SCORING == 1:
        score = tl.sigmoid(logit)
    elif SCORING == 2:
        score = sqrt_softplus(logit)
    else:
        top = tl.max(tl.max(tl.where(valid, logit, float("-inf")), axis=1), axis=0)
        p = tl.where(valid, tl.exp(logit - top), 0.0)
        score = p / tl.sum(tl.sum(p, axis=1), axis=0)
    choice = score
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))
    if METHOD != 0:
        best = tl.max(choice, axis=1)  # [BLOCK_G]
        if METHOD == 2:  # sum of the group's top-2: drop the (first) maximum and take the max again
            first = tl.min(tl.where(choice == best[:, None], j, BLOCK_S), axis=1)
            best = best + tl.max(tl.where(j == first[:, None], float("-inf"), choice), axis=1)
        gid = tl.arange(0, BLOCK_G)
        group_score = tl.where(gid < NG, best, float("-inf"))
        keep = gid < 0
        for _ in tl.static_range(TOPK_GROUP):
            top_g = tl.max(group_score, axis=0)
            pick_g = tl.min(tl.where(group_score == top_g, gid, BLOCK_G), axis=0)
            keep = keep | (gid == pick_g)
            group_score = tl.where(gid == pick_g, float("-inf"), group_score)
        choice = tl.where(keep[:, None], choice, float("-inf"))
    slot = tl.arange(0, BLOCK_K)
    gates = tl.zeros((BLOCK_K,), dtype=tl.float32)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
    for s in tl.static_range(TOP_K):
        top = tl.max(tl.max(choice, axis=1), axis=0)
        pick_e = tl.min(tl.min(tl.where(valid & (choice == top), expert, E), axis=1), axis=0)
        hit = valid & (expert == pick_e)  # padded lanes alias the next group's ids
        gate = tl.sum(tl.sum(tl.where(hit, score, 0.0), axis=1), axis=0)
        gates = tl.where(slot == s, gate, gates)
        ids = tl.where(slot == s, pick_e.to(tl.int64), ids)
        choice = tl.where(hit, float("-inf"), choice)
    if NORM:
        gates = gates / (tl.sum(gates, axis=0) + 1e-20)
    gates = gates * SCALE
    row = tok * (TOP_K + EXTRA)
    tl.store(w_out_ptr + row + slot, gates, mask=slot < TOP_K)
    tl.store(id_out_ptr + row + slot, ids, mask=slot < TOP_K)
    if EXTRA > 0:  # experts E..E+EXTRA-1 every token takes with weight 1 (shared experts folded into the MoE)
        more = tl.arange(0, BLOCK_X)
        tl.store(w_out_ptr + row + TOP_K + more, tl.full((BLOCK_X,), 1.0, tl.float32), mask=more < EXTRA)
        tl.store(id_out_ptr + row + TOP_K + more, (E + more).to(tl.int64), mask=more < EXTRA)


@triton.jit
def _logits_kernel(x_ptr, w_ptr, out_ptr, E, D, stride_x, stride_w,
                   BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, p, e] = sum over the p-th BLOCK_D slice of d of x[t, d] * w[e, d], fp32, for BLOCK_E experts."""
    tok = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    part = tl.program_id(2)
    d = part * BLOCK_D + tl.arange(0, BLOCK_D)
    e_ok, d_ok = e < E, d < D
    xv = tl.load(x_ptr + tok * stride_x + d, mask=d_ok, other=0.0).to(tl.float32)
    wv = tl.load(w_ptr + e[:, None] * stride_w + d[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
    partial = tl.sum(wv.to(tl.float32) * xv[None, :], 1)
    tl.store(out_ptr + (tok * tl.num_programs(2) + part) * E + e, partial, mask=e_ok)


def router_logits(x: torch.Tensor, weight: torch.Tensor, block_d: int = 256) -> torch.Tensor:
    """Partial router logits [N, P, E] (fp32, the `moe.gate` reference's precision) whose sum over P is
    x [N, D] @ weight [E, D]^T: one program per token x 16 experts x `block_d` slice of D, so even one token's
    GEMV spreads over many SMs; `route` sums the P partials as it loads them (no extra launch)."""
    check_device("router logits", x)
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ShapeError(f"router logits: x [N, D] and weight [E, D]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    n, d = x.shape
    e = weight.shape[0]
    block_e = 16
    parts = triton.cdiv(d, block_d)
    out = torch.empty((n, parts, e), dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    _logits_kernel[(n, triton.cdiv(e, block_e), parts)](
        x, weight, out, e, d, x.stride(0), weight.stride(0), BLOCK_E=block_e, BLOCK_D=block_d, num_warps=4)
    return out


def _check_route(e, bias, top_k, scoring, method, n_group, topk_group):
    if scoring not in _SCORINGS:
        raise ShapeError(f"moe routing: scoring {scoring!r} not in {sorted(_SCORINGS)}")
    if method not in _METHODS:
        raise ShapeError(f"moe routing: method {method!r} not in {sorted(_METHODS)}")
    if not 0 < top_k <= e:
        raise ShapeError(f"moe routing: top_k {top_k} must be in 1..{e}")
    if method != "greedy" and (e % n_group or not 0 < topk_group <= n_group):
        raise ShapeError(f"moe routing: {e} experts in {n_group} groups with topk_group {topk_group}")
    if bias is not None and bias.shape != (e,):
        raise ShapeError(f"moe routing: bias must be [{e}], got {tuple(bias.shape)}")


def route(logits: torch.Tensor | None, bias: torch.Tensor | None = None, *, top_k: int, scoring: str = "softmax",
          method: str = "greedy", n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = False,
          routed_scaling_factor: float = 1.0, x: torch.Tensor | None = None, gate_weight: torch.Tensor | None = None,
          extra: int = 0):
    """(gate weights [N, k] fp32, expert ids [N, k] int64) from logits [N, E] (or their partial sums [N, P, E],
    as `router_logits` gives them), or from x [N, D] and the router weight [E, D] when `logits` is None
    (moe.gate). `extra` > 0 appends experts E..E+extra-1 with weight 1 to every row ([N, k + extra]): the shared
    experts `group_moe(fold_shared_experts=True)` adds, without a concat launch."""
    fused = logits is None
    src = x if fused else logits
    check_device("moe route", src)
    partial = not fused and logits.dim() == 3
    if src.dim() != 2 and not partial:
        raise ShapeError(f"moe route: {'x' if fused else 'logits'} must be [N, E] or [N, P, E], got "
                         f"{tuple(src.shape)}")
    if fused and (gate_weight is None or gate_weight.dim() != 2 or gate_weight.shape[1] != x.shape[1]):
        raise ShapeError(f"moe gate: weight must be [E, {x.shape[1]}], got "
                         f"{None if gate_weight is None else tuple(gate_weight.shape)}")
    e = gate_weight.shape[0] if fused else logits.shape[-1]
    _check_route(e, bias, top_k, scoring, method, n_group, topk_group)
    ng = n_group if method != "greedy" else 1
    n = src.shape[0]
    weights = torch.empty((n, top_k + extra), dtype=torch.float32, device=src.device)
    ids = torch.empty((n, top_k + extra), dtype=torch.int64, device=src.device)
    if n == 0:
        return weights, ids
    if fused:
        x = x if x.stride(-1) == 1 else x.contiguous()
        gate_weight = gate_weight.contiguous()
    else:
        logits = logits.contiguous() if partial or logits.stride(-1) != 1 else logits
    gs = e // ng
    block_d = 0
    if fused:
        block_d = max(1, min(triton.next_power_of_2(x.shape[1]), max(16, 4096 // triton.next_power_of_2(e))))
    dummy = weights
    _route_kernel[(n,)](
        logits if not fused else dummy, x if fused else dummy, gate_weight if fused else dummy,
        bias if bias is not None else dummy, weights, ids,
        logits.stride(0) if not fused else 0, x.stride(0) if fused else 0,
        gate_weight.stride(0) if fused else 0, x.shape[1] if fused else 0, PARTS=logits.shape[1] if partial else 1,
        E=e, NG=ng, GS=gs, BLOCK_G=triton.next_power_of_2(ng), BLOCK_S=triton.next_power_of_2(gs), TOP_K=top_k,
        BLOCK_K=triton.next_power_of_2(top_k), TOPK_GROUP=topk_group if method != "greedy" else 1,
        SCORING=_SCORINGS[scoring], METHOD=_METHODS[method], HAS_BIAS=bias is not None,
        NORM=bool(norm_topk_prob and (top_k > 1 or scoring == "sqrtsoftplus")), SCALE=float(routed_scaling_factor),
        FUSED_GATE=fused, BLOCK_D=max(block_d, 1), EXTRA=extra, BLOCK_X=triton.next_power_of_2(max(extra, 1)),
        num_warps=1 if e <= 64 else 4)
    return weights, ids
