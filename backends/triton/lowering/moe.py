"""MoE lowerings: routing kernel, grouped-GEMM MoE for the per-expert form (weights stacked at compile time) and
for the grouped chain the `group_moe` pass emits (permute -> grouped_gemm -> act.swiglu -> grouped_gemm ->
unpermute, claimed as one fused region), plus single-op fallbacks for pieces of a chain that does not match."""
from __future__ import annotations

import torch

from ..kernels import moe as moe_k
from ..kernels import routing
from .registry import Decline, Lowered, lowering


def _route_kwargs(node):
    return {k: node.attrs[k] for k in ("top_k", "scoring", "method", "n_group", "topk_group", "norm_topk_prob",
                                      "routed_scaling_factor")}


@lowering("moe.route")
def _route(node, ctx):
    kw = _route_kwargs(node)
    return Lowered(lambda a, sym: list(routing.route(a[0], a[1] if len(a) > 1 else None, **kw)), "template",
                   "routing._route_kernel", f"{kw['scoring']}, {kw['method']}, top-{kw['top_k']}")


ROUTER_KERNEL_TOKENS = 16  # up to this many tokens the router logits come from `routing.router_logits`


@lowering("moe.gate")
def _gate(node, ctx):
    """On GPUs the router GEMM runs in fp32 (the reference's precision) apart from the routing kernel: for decode
    (<= ROUTER_KERNEL_TOKENS tokens) in `router_logits`, whose programs split the experts and the hidden dim (H100,
    V2-Lite, one token: 3.3 us, where the cast + cuBLAS GEMV + reduce took 6.7 us), for prefill in cuBLAS. The
    one-kernel form, which streams the router weight once per token in a single program, is kept for the
    interpreter, where launches are what costs."""
    kw = _route_kwargs(node)
    bias = lambda a: a[2] if len(a) > 2 else None  # noqa: E731
    w = node.inputs[1]
    how = f"{kw['scoring']}, {kw['method']}, top-{kw['top_k']}"
    if ctx.interpreting or not ctx.is_const(w):
        return Lowered(lambda a, sym: list(routing.route(None, bias(a), x=a[0], gate_weight=a[1], **kw)),
                       "template", "routing._route_kernel (router GEMM fused)", how)
    weight = ctx.const(w)
    w32_t = weight.float().t()

    def run(a, sym):
        x = a[0]
        logits = routing.router_logits(x, weight) if x.shape[0] <= ROUTER_KERNEL_TOKENS else torch.mm(x.float(), w32_t)
        return list(routing.route(logits, bias(a), **kw))
    return Lowered(run, "template", f"routing._logits_kernel (<= {ROUTER_KERNEL_TOKENS} tokens; else torch.mm, "
                   "cuBLAS fp32) + routing._route_kernel", how)


def _dtype_ok(ctx, dtype: str):
    if ctx.interpreting and dtype == "bfloat16":
        return Decline("Triton's interpreter computes bf16 tl.dot wrongly; bf16 MoE runs on CUDA")
    return None


@lowering("moe.experts")
def _experts(node, ctx):
    x, w, idx, *ws = node.inputs
    bad = _dtype_ok(ctx, x.dtype)
    if bad or not all(ctx.is_const(v) for v in ws):
        return bad or Decline("expert weights are not compile-time constants")
    e = node.attrs["num_experts"]
    gate_up = torch.stack([torch.cat([ctx.const_uncached(ws[3 * j]), ctx.const_uncached(ws[3 * j + 1])], 0)
                           for j in range(e)])
    down = torch.stack([ctx.const_uncached(ws[3 * j + 2]) for j in range(e)])
    return Lowered(lambda a, sym: [moe_k.fused_moe(a[0], a[1], a[2], gate_up, down)], "template",
                   "moe.fused_moe (align + gate|up GEMM with SwiGLU + down GEMM with routing weight + reduce)",
                   f"{e} experts stacked at compile time", inputs=(x, w, idx))


def _next_op(ctx, v, op):
    """The node that alone reads v, if it is an `op`."""
    user = ctx.sole_user(v)
    return user if user is not None and user.op == op else None


def _match_chain(p, ctx):
    """permute -> grouped_gemm(gate_up) -> act.swiglu -> grouped_gemm(down) -> unpermute, or None."""
    x_perm, order, offsets = p.outputs
    g1 = _next_op(ctx, x_perm, "moe.grouped_gemm")
    act = g1 and _next_op(ctx, g1.outputs[0], "act.swiglu")
    g2 = act and _next_op(ctx, act.outputs[0], "moe.grouped_gemm")
    un = g2 and _next_op(ctx, g2.outputs[0], "moe.unpermute")
    if not un or g1.inputs[0] is not x_perm or g1.inputs[2] is not offsets or g2.inputs[2] is not offsets:
        return None
    if un.inputs[0] is not g2.outputs[0] or un.inputs[2] is not order or set(order.users) != {un}:
        return None
    if set(offsets.users) != {g1, g2} or not (ctx.is_const(g1.inputs[1]) and ctx.is_const(g2.inputs[1])):
        return None
    nodes = [p, g1, act, g2, un]
    if not all(ctx.free(n) for n in nodes[1:]) or not ctx.region_ok(nodes):
        return None
    return nodes


@lowering("moe.permute")
def _permute(node, ctx):
    x, idx = node.inputs
    chain = _match_chain(node, ctx) if _dtype_ok(ctx, x.dtype) is None else None
    if chain is not None:
        _, g1, _, g2, un = chain
        gate_up, down = ctx.const(g1.inputs[1]), ctx.const(g2.inputs[1])
        return Lowered(lambda a, sym: [moe_k.fused_moe(a[0], a[2], a[1], gate_up, down)], "template",
                       "moe.fused_moe (align + gate|up GEMM with SwiGLU + down GEMM with routing weight + reduce)",
                       "grouped chain fused; x_perm never materialised", nodes=tuple(chain),
                       inputs=(x, idx, un.inputs[1]), outputs=(un.outputs[0],))
    e = node.attrs["num_experts"]

    def run(a, sym):
        x, ids = a
        k = ids.shape[1]
        order = torch.argsort(ids.reshape(-1), stable=True)
        offsets = torch.zeros(e + 1, dtype=torch.int64, device=x.device)
        offsets[1:] = torch.cumsum(moe_k.expert_counts(ids.reshape(-1), e), 0)
        return [x[order // k], order, offsets]
    return Lowered(run, "library", "torch.argsort + scatter_add count + index (chain not fusable)")


@lowering("moe.grouped_gemm")
def _grouped(node, ctx):
    bad = _dtype_ok(ctx, node.inputs[0].dtype)
    if bad:
        return bad
    return Lowered(lambda a, sym: [moe_k.grouped_gemm(a[0], a[1], a[2])], "template", "moe.grouped_gemm")


@lowering("moe.unpermute")
def _unpermute(node, ctx):
    return Lowered(lambda a, sym: [moe_k.unpermute(a[0], a[1], a[2])], "template", "moe._reduce_kernel (gather)")
