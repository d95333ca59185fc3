"""DeepSeek-V4's residual and FFN ops on triton, one launch each: the mHC mix with its Sinkhorn iterations
(hc.pre), the stream update (hc.post), the hyper-head (hc.head), sqrtsoftplus routing (the V3 router kernel with
a third scoring), hash routing, the generated unweighted RMSNorm and clamped SwiGLU. The dense clamped MLP is
fuse_swiglu's to rewrite into GEMMs around act.swiglu_clamped (a fusion lives in its pass)."""
from __future__ import annotations

from dsgraph.backends.lowering import Decline

from ..codegen import rowwise
from ..kernels import routing
from ..kernels import v4_mix as mix
from .registry import TABLE, Lowered

_FLOATS = ("float32", "float16", "bfloat16")


def _static_float(node, what: str) -> Decline | None:
    x = node.inputs[0]
    dims = x.shape[2:] if node.op.startswith("hc.") else x.shape[-1:]
    if not all(isinstance(d, int) for d in dims) or x.dtype not in _FLOATS:
        return Decline(f"{what} over {x.type}: the kernel needs static {'N, D' if len(dims) > 1 else 'width'} and "
                       "fp32/fp16/bf16")
    return None


@TABLE.register("hc.pre")
def _hc_pre(ctx, node):
    if bad := _static_float(node, "hc.pre"):
        return bad
    a = node.attrs
    return Lowered("template", "v4_mix._hc_mix_kernel (RMS + (2+N)N projection + Sinkhorn + merge, one program a "
                   "token)", f"{a['iters']} Sinkhorn iterations in registers",
                   fn=lambda t, sym: list(mix.hc_mix(*t, iters=a["iters"], eps=a["eps"], norm_eps=a["norm_eps"])))


@TABLE.register("hc.head")
def _hc_head(ctx, node):
    if bad := _static_float(node, "hc.head"):
        return bad
    a = node.attrs
    return Lowered("template", "v4_mix._hc_mix_kernel (hyper-head: RMS + N projection + merge)",
                   fn=lambda t, sym: [mix.hc_mix(*t, eps=a["eps"], norm_eps=a["norm_eps"], full=False)])


@TABLE.register("hc.post")
def _hc_post(ctx, node):
    if bad := _static_float(node, "hc.post"):
        return bad
    return Lowered("template", "v4_mix._hc_post_kernel (post * y + comb^T @ streams)",
                   fn=lambda t, sym: [mix.hc_post(*t)])


@TABLE.register("moe.route_sqrtsoftplus")
def _route_ssp(ctx, node):
    k, rsf = node.attrs["top_k"], node.attrs["routed_scaling_factor"]
    return Lowered("template", "routing._route_kernel", f"sqrtsoftplus, greedy, top-{k}",
                   fn=lambda t, sym: list(routing.route(t[0], t[1], top_k=k, scoring="sqrtsoftplus",
                                                        norm_topk_prob=True, routed_scaling_factor=rsf)))


@TABLE.register("moe.route_hash")
def _route_hash(ctx, node):
    rsf = node.attrs["routed_scaling_factor"]
    return Lowered("template", "v4_mix._hash_route_kernel (tid2eid lookup + sqrtsoftplus gates)",
                   fn=lambda t, sym: list(mix.route_hash(*t, routed_scaling_factor=rsf)))


@TABLE.register("norm.rms_unweighted")
def _rms_plain(ctx, node):
    if bad := _static_float(node, "norm.rms_unweighted"):
        return bad
    x = node.inputs[0]
    src = ctx.generated(rowwise.rms_norm(x.shape[-1], x.dtype, node.attrs["eps"], residual=False, weighted=False),
                        node)
    return Lowered("generated", src.name, fn=lambda t, sym: [src(t[0])])


@TABLE.register("act.swiglu_clamped")
def _swiglu_clamped(ctx, node):
    """Outside the fused MoE chain (which takes its own activation): the dense MLP after fuse_swiglu."""
    if bad := _static_float(node, "act.swiglu_clamped"):
        return bad
    x = node.inputs[0]
    src = ctx.generated(rowwise.swiglu(x.shape[-1] // 2, x.dtype, limit=node.attrs["limit"]), node)
    return Lowered("generated", src.name, fn=lambda t, sym: [src(t[0])])


@TABLE.register("mlp.swiglu_clamped")
def _mlp_clamped(ctx, node):
    return Decline("mlp.swiglu_clamped: run fuse_swiglu first (it stacks gate|up into one GEMM's weight, then the "
                   "generated act.swiglu_clamped and the down GEMM lower on their own)")
