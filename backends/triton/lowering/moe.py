"""MoE lowerings: routing kernel, the fused MoE template for the grouped chain the `group_moe` pass emits
(permute -> grouped_gemm -> act.swiglu -> grouped_gemm -> unpermute, a declared region claimed as one step; with
MXFP4 experts, reshape(dequant_mxfp4(packed, scales)) stacks, its MXFP4 form reading the packed params), plus
single-op kernels for pieces of a chain that does not match. The per-expert form declines: expert stacking lives
in `group_moe`, which the triton pipeline runs."""
from __future__ import annotations

import torch
from dsgraph.backends.lowering import Decline
from dsgraph.passes.weightref import mxfp4_ref

from dsgraph.pattern import ANY, P, Roots, Var

from ..kernels import moe as moe_k
from ..kernels import moe_mxfp4, routing
from .registry import TABLE, Lowered


def _route_kwargs(node):
    return {k: node.attrs[k] for k in ("top_k", "scoring", "method", "n_group", "topk_group", "norm_topk_prob",
                                      "routed_scaling_factor")}


@TABLE.register("moe.route")
def _route(ctx, node):
    kw = _route_kwargs(node)
    return Lowered("template", "routing._route_kernel", f"{kw['scoring']}, {kw['method']}, top-{kw['top_k']}",
                   fn=lambda a, sym: list(routing.route(a[0], a[1] if len(a) > 1 else None, **kw)))


ROUTER_KERNEL_TOKENS = 16  # up to this many tokens the router logits come from `routing.router_logits`


def _gate_out(i: int) -> P:
    return P("moe.gate", Var("x"), Var("gw"), rest="bias", out=i, name="gate", top_k=ANY)


# group_moe(fold_shared_experts=True)'s routing: the shared experts appended to every row as constant columns,
# concat(ids, expand(E..E+n-1)) and concat(weights, expand(1.0)), which the routing kernel writes itself
WITH_SHARED = Roots(P("concat", _gate_out(1), P("expand", Var("shared_ids")), dim=1, name="ids"),
                    P("concat", _gate_out(0), P("expand", Var("shared_w")), dim=1, name="weights"))


def _shared_columns(ctx, node) -> tuple[int, tuple] | None:
    """(n, the region's nodes) where WITH_SHARED matches at `node` with the constants the fold makes (ids
    E..E+n-1, weights 1), else None."""
    m = ctx.region(WITH_SHARED, node, anchor="gate")
    if m is None or not (ctx.is_const(m["shared_ids"]) and ctx.is_const(m["shared_w"])):
        return None
    ids, w, e = ctx.const(m["shared_ids"]), ctx.const(m["shared_w"]), node.inputs[1].shape[0]
    n = ids.shape[-1]
    if ids.shape != (1, n) or w.shape != (1, n) or not torch.equal(ids.cpu()[0], torch.arange(e, e + n)) \
            or not bool((w == 1).all()):
        return None
    return n, tuple(m.nodes), (m.node("weights").outputs[0], m.node("ids").outputs[0])


@TABLE.register("moe.gate")
def _gate(ctx, node):
    """On GPUs the router GEMM runs in fp32 (the reference's precision) apart from the routing kernel: for decode
    (<= ROUTER_KERNEL_TOKENS tokens) in `router_logits`, whose programs split the experts and the hidden dim (H100,
    V2-Lite, one token: 3.3 us, where the cast + cuBLAS GEMV + reduce took 6.7 us), for prefill in cuBLAS. The
    one-kernel form, which streams the router weight once per token in a single program, is kept for the
    interpreter, where launches are what costs. Folded shared experts (WITH_SHARED) are columns the routing
    kernel writes too: the two concats are never launched."""
    kw = _route_kwargs(node)
    bias = lambda a: a[2] if len(a) > 2 else None  # noqa: E731
    how = f"{kw['scoring']}, {kw['method']}, top-{kw['top_k']}"
    shared = _shared_columns(ctx, node)
    region = {}
    if shared is not None:
        kw["extra"], nodes, outputs = shared
        how += f", + {kw['extra']} shared experts written as constant columns (no concat)"
        region = {"nodes": nodes, "inputs": tuple(node.inputs), "outputs": outputs}
    if ctx.interpreting:
        return Lowered("template", "routing._route_kernel (router GEMM fused)", how, **region,
                       fn=lambda a, sym: list(routing.route(None, bias(a), x=a[0], gate_weight=a[1], **kw)))

    def run(a, sym):
        x, weight = a[0], a[1]
        few = x.shape[0] <= ROUTER_KERNEL_TOKENS
        logits = routing.router_logits(x, weight) if few else torch.mm(x.float(), weight.float().t())
        return list(routing.route(logits, bias(a), **kw))
    return Lowered("template", f"routing._logits_kernel (<= {ROUTER_KERNEL_TOKENS} tokens; else torch.mm, "
                   "cuBLAS fp32) + routing._route_kernel", how, **region, fn=run)


def _dtype_ok(ctx, dtype: str):
    if ctx.interpreting and dtype == "bfloat16":
        return Decline("Triton's interpreter computes bf16 tl.dot wrongly; bf16 MoE runs on CUDA")
    return None


@TABLE.register("moe.experts")
def _experts(ctx, node):
    return Decline("per-expert moe.experts: run group_moe first (it stacks the experts' weights into the grouped "
                   "chain the fused MoE template takes)")


def _permuted(out: int) -> P:
    return P("moe.permute", Var("x"), Var("idx"), out=out, name="perm", num_experts=ANY)


# the grouped chain `group_moe` emits: permute -> grouped_gemm(gate_up) -> act.swiglu -> grouped_gemm(down) ->
# unpermute, every value inside read only by the chain
def _chain(act: str, **attrs) -> P:
    return P("moe.unpermute",
             P("moe.grouped_gemm",
               P(act, P("moe.grouped_gemm", _permuted(0), Var("gate_up"), _permuted(2)), name="act", **attrs),
               Var("down"), _permuted(2)),
             Var("w"), _permuted(1))


GROUPED_CHAIN = _chain("act.swiglu")
CLAMPED_CHAIN = _chain("act.swiglu_clamped", limit=ANY)   # DeepSeek-V4's experts


@TABLE.register("moe.permute")
def _permute(ctx, node):
    x, idx = node.inputs
    ok = _dtype_ok(ctx, x.dtype) is None
    m = ctx.region(GROUPED_CHAIN, node, anchor="perm") if ok else None
    m = m or (ctx.region(CLAMPED_CHAIN, node, anchor="perm") if ok else None)
    if m is not None:
        act = m.node("act")
        limit = act.attrs["limit"] if act.op == "act.swiglu_clamped" else None
        clamp = "; SwiGLU clamped at the limit (V4)" if limit is not None else ""
        region = dict(nodes=tuple(m.nodes), outputs=(m.root_value,))
        packed = [_mxfp4_stack(m[k]) for k in ("gate_up", "down")]
        if all(packed):
            (gu, gu_shape), (dn, dn_shape) = packed
            views = (gu_shape[:2], gu_shape[:2], dn_shape[:2], dn_shape[:2])   # [E * rows, *] -> [E, rows, *]

            def run_mxfp4(a, sym):
                weights = [t.view(*shape, -1) for t, shape in zip(a[3:], views)]
                return [moe_mxfp4.fused_moe_mxfp4(a[0], a[2], a[1], *weights, limit=limit)]
            return Lowered("template", "moe_mxfp4.fused_moe_mxfp4 (align + MXFP4 gate|up GEMM with SwiGLU + MXFP4 "
                           "down GEMM with routing weight + reduce)" + clamp,
                           "grouped chain fused on the MXFP4 experts: packed e2m1 + e8m0 scales decoded in "
                           "registers, no dequantised copy", inputs=(x, idx, m["w"], gu.w, gu.s, dn.w, dn.s),
                           fn=run_mxfp4, **region)
        return Lowered("template",
                       "moe.fused_moe (align + gate|up GEMM with SwiGLU + down GEMM with routing weight + reduce)"
                       + clamp, "grouped chain fused; x_perm never materialised",
                       inputs=(x, idx, m["w"], m["gate_up"], m["down"]),
                       fn=lambda a, sym: [moe_k.fused_moe(a[0], a[2], a[1], a[3], a[4], limit=limit)], **region)
    e = node.attrs["num_experts"]

    def run(a, sym):
        x, ids = a
        k = ids.shape[1]
        order = torch.argsort(ids.reshape(-1), stable=True)
        offsets = torch.zeros(e + 1, dtype=torch.int64, device=x.device)
        offsets[1:] = torch.cumsum(moe_k.expert_counts(ids.reshape(-1), e), 0)
        return [x[order // k], order, offsets]
    return Lowered("library", "torch.argsort + scatter_add count + index (chain not fusable)", fn=run)


def _mxfp4_stack(v):
    """(the MXFP4 ref, [E, rows, K]) of a stacked expert weight reshape(dequant_mxfp4(packed, scales)) that
    `group_moe` builds from MXFP4 experts, read by nothing else; else None."""
    node = v.node
    if node is None or node.op != "reshape" or len(node.inputs[0].users) != 1:
        return None
    ref = mxfp4_ref(node.inputs[0])
    return (ref, tuple(v.type.shape)) if ref is not None and len(v.type.shape) == 3 else None


@TABLE.register("moe.grouped_gemm")
def _grouped(ctx, node):
    bad = _dtype_ok(ctx, node.inputs[0].dtype)
    if bad:
        return bad
    return Lowered("template", "moe.grouped_gemm", fn=lambda a, sym: [moe_k.grouped_gemm(a[0], a[1], a[2])])


@TABLE.register("moe.unpermute")
def _unpermute(ctx, node):
    return Lowered("template", "moe._reduce_kernel (gather)", fn=lambda a, sym: [moe_k.unpermute(a[0], a[1], a[2])])
