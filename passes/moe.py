"""MoE grouping: per-expert `moe.experts` (and V4's `moe.experts_clamped`, whose SwiGLU becomes
`act.swiglu_clamped`) -> the grouped form grouped-GEMM kernels consume.

    xp, order, offsets = moe.permute(x, idx)          # token copies sorted by expert
    h  = moe.grouped_gemm(xp, gate_up[E, 2I, D], offsets)
    y  = moe.grouped_gemm(act.swiglu(h), down[E, D, I], offsets)
    out = moe.unpermute(y, w, order)                  # weighted index_add back to tokens

The stacked weights are derived lazily from the per-expert checkpoint tensors.
With `fold_shared_experts`, `add(experts(x), swiglu_shared(x))` becomes one grouped
MoE whose extra n_shared experts (the shared MLP split into chunks of I) every token
selects with weight 1 — exact, since SwiGLU is a sum over its intermediate units.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsgraph.ir import Graph, Value
from dsgraph.pattern import ANY, P, Var
from dsgraph.rewriter import Rewrite, apply_rewrites
from dsgraph.weights import WeightStore

from .base import register
from .fusion import PatternPass
from .weightref import dense_param, mxfp4_ref, stack_rows, weight_ref

X, WT, IDX = Var("x"), Var("w"), Var("idx")


def _grouped(b, x: Value, w: Value, idx: Value, gate_up: Value, down: Value, num_experts: int, top_k: int,
             limit: float | None = None):
    xp, order, offsets = b.moe.permute(x, idx, num_experts=num_experts)
    h = b.moe.grouped_gemm(xp, gate_up, offsets)
    act = b.act.swiglu(h) if limit is None else b.act.swiglu_clamped(h, limit=limit)
    y = b.moe.grouped_gemm(act, down, offsets)
    for v in (h, y):  # graph.summary() counts activated params per token from this
        v.node.meta["top_k"] = top_k
    return b.moe.unpermute(y, w, order)


def _prefix(ref) -> str:
    """'model.layers.3.mlp.experts.0.gate_proj' -> 'model.layers.3.mlp.experts'."""
    return ref.base.rsplit(".", 2)[0]


@register
@dataclass
class GroupMoE(PatternPass):
    """moe.experts (per-expert weights) -> permute / grouped GEMM / SwiGLU / grouped GEMM / un-permute over
    stacked `<mlp>.experts.gate_up_proj` [E, 2I, D] and `<mlp>.experts.down_proj` [E, D, I] params.
    FP8 experts stay FP8 (stacked with their scales) when the blocks align, MXFP4 experts (V4) stay MXFP4
    (`<..>.gate_up_proj.weight` / `.scale`, the packed rows and their e8m0 scales); with fold_shared_experts the
    stacked weights (shared chunks included) are dense, dequantised from FP8 if need be."""

    name = "group_moe"
    description = "per-expert MoE -> permute + grouped GEMMs + weighted un-permute (stacked expert weights)"
    fold_shared_experts: bool = False

    def rewrites(self, graph: Graph, weights: WeightStore) -> list[Rewrite]:
        experts = P("moe.experts", X, WT, IDX, rest="ws", num_experts=ANY, name="routed")
        clamped = P("moe.experts_clamped", X, WT, IDX, rest="ws", num_experts=ANY, limit=ANY, name="routed")

        def build(b, m):
            refs = [weight_ref(v) or mxfp4_ref(v) for v in m["ws"]]
            if any(r is None for r in refs):
                return None
            e, dtype = m.attr("num_experts", "routed"), m["x"].dtype
            inter, d = refs[0].value.shape
            gu = stack_rows(b, weights, f"{_prefix(refs[0])}.gate_up_proj",
                            [r for i, r in enumerate(refs) if i % 3 != 2], dtype)
            dn = stack_rows(b, weights, f"{_prefix(refs[0])}.down_proj", refs[2::3], dtype)
            gu, dn = b.reshape(gu, shape=(e, 2 * inter, d)), b.reshape(dn, shape=(e, d, inter))
            limit = m.attr("limit", "routed") if m["routed"].node.op == "moe.experts_clamped" else None
            out = _grouped(b, m["x"], m["w"], m["idx"], gu, dn, e, m["idx"].shape[1], limit)
            return {m["routed"]: out}

        def build_folded(b, m):
            refs = [weight_ref(v) for v in m["ws"]]
            shared = [weight_ref(v) for v in (m["sg"], m["su"], m["sd"])]
            if any(r is None for r in refs + shared):
                return None
            e, dtype, x = m.attr("num_experts", "routed"), m["x"].dtype, m["x"]
            inter, d = refs[0].value.shape
            n_sh, rem = divmod(shared[0].value.shape[0], inter)
            if rem:
                return None  # the shared MLP is not a whole number of experts
            prefix = _prefix(refs[0])

            def stack_gate_up(*ts):  # (g0, u0, g1, u1, ..., shared_g, shared_u) fp32
                g_sh, u_sh = ts[-2].view(n_sh, inter, d), ts[-1].view(n_sh, inter, d)
                routed = [torch.cat((ts[2 * i], ts[2 * i + 1])) for i in range(e)]
                return torch.stack(routed + [torch.cat((g_sh[j], u_sh[j])) for j in range(n_sh)])

            def stack_down(*ts):  # (d0, ..., d_{E-1}, shared_d [D, n_sh*I])
                return torch.stack(list(ts[:-1]) + list(ts[-1].view(d, n_sh, inter).unbind(1)))

            gu = dense_param(b, weights, f"{prefix}.gate_up_proj_with_shared.weight", (e + n_sh, 2 * inter, d),
                             dtype, stack_gate_up, *[r for i, r in enumerate(refs) if i % 3 != 2], *shared[:2])
            dn = dense_param(b, weights, f"{prefix}.down_proj_with_shared.weight", (e + n_sh, d, inter), dtype,
                             stack_down, *refs[2::3], shared[2])
            n = x.shape[0]
            ids = b.expand(b.constant(value=tuple(range(e, e + n_sh)), shape=(1, n_sh), dtype="int64"), shape=(n, n_sh))
            ones = b.expand(b.constant(value=1.0, shape=(1, n_sh), dtype="float32"), shape=(n, n_sh))
            idx = b.concat(m["idx"], ids, dim=1)
            w = b.concat(m["w"], ones, dim=1)
            out = _grouped(b, x, w, idx, gu, dn, e + n_sh, m["idx"].shape[1] + n_sh)
            return {m.root_value: out}

        shared = P("mlp.swiglu", X, Var("sg"), Var("su"), Var("sd"))
        return [Rewrite("moe_fold_shared", P("add", experts, shared), build_folded),
                Rewrite("moe", experts, build), Rewrite("moe_clamped", clamped, build)]

    def run(self, graph: Graph, weights: WeightStore) -> dict:
        # two phases: the experts node precedes the add, so a single table would group it unfolded first
        folded, *plain = self.rewrites(graph, weights)
        stats = apply_rewrites(graph, [folded]) if self.fold_shared_experts else {"matched": 0, "rewritten": 0}
        rest = apply_rewrites(graph, plain)
        out = {k: stats.get(k, 0) + rest.get(k, 0) for k in set(stats) | set(rest)}
        out["params_removed"] = len(graph.remove_unused_inputs(("param",)))
        return out
