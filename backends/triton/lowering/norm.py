"""Generated row kernels for norm.rms, norm.add_rms, act.swiglu and rope (see codegen/rowwise.py, rope.py)."""
from __future__ import annotations

import torch
from dsgraph.backends.lowering import Decline

from dsgraph.ops.rope import rope_frequencies
from dsgraph.pattern import ANY, P, Var

from ..codegen import rope as rope_gen
from ..codegen import rowwise
from .registry import TABLE, Lowered

_FLOATS = ("float32", "float16", "bfloat16")


def _width(node) -> int | None:
    d = node.inputs[0].shape[-1]
    return d if isinstance(d, int) else None


# absorbed MLA's cache row as `absorb_mla` builds it: concat(norm.rms(c_kv), reshape(rope(reshape(k_pe))))
CACHE_ROW = P("concat",
              P("norm.rms", Var("c_kv"), Var("w"), eps=ANY, name="rms"),
              P("reshape", P("rope", P("reshape", Var("k_pe"), shape=ANY, name="heads"), Var("pos"), name="rope"),
                shape=ANY),
              dim=ANY, name="cat")


@TABLE.register("norm.rms")
def _mla_cache_row(ctx, node):
    """The region CACHE_ROW in one generated kernel instead of three launches (RMSNorm, RoPE, concat). Claimed
    from the RMSNorm, the region's first node; every value inside it feeds only the region."""
    m = ctx.region(CACHE_ROW, node, anchor="rms")
    if m is None:
        return Decline("not absorbed MLA's cache row concat(norm.rms(c_kv), reshape(rope(reshape(k_pe))))")
    rope, cat = m.node("rope"), m.node("cat")
    rank, dim, dtype = m["c_kv"].shape[-1], m["k_pe"].shape[-1], m["c_kv"].dtype
    if (not all(isinstance(d, int) for d in (rank, dim)) or dtype not in _FLOATS or rope.inputs[0].shape[-2] != 1
            or cat.attrs["dim"] not in (-1, len(cat.outputs[0].shape) - 1)):
        return Decline(f"cache row of {m['c_kv'].type} and {m['k_pe'].type} (one rope head, static widths, "
                       "fp32/fp16/bf16, concat on the last dim) is outside the generated kernel")
    inv_freq, mult = rope_frequencies(rope.attrs, dim)
    inv_freq = inv_freq.to(device=ctx.device, dtype=torch.float32).contiguous()
    src = ctx.generated(rope_gen.mla_cache_row(rank, dim, dtype, node.attrs["eps"], rope.attrs["interleaved"], mult),
                        *m.nodes)
    return Lowered("generated", src.name, nodes=tuple(m.nodes), inputs=(m["c_kv"], m["k_pe"], m["w"], m["pos"]),
                   outputs=cat.outputs, fn=lambda a, sym: [src(a[0], a[1], a[2], a[3], inv_freq)])


@TABLE.register("norm.rms", "norm.add_rms")
def _rms(ctx, node):
    n, dtype = _width(node), node.inputs[0].dtype
    if n is None or dtype not in _FLOATS:
        return Decline(f"row width {node.inputs[0].shape[-1]} / dtype {dtype} not supported by the generated kernel")
    residual = node.op == "norm.add_rms"
    src = ctx.generated(rowwise.rms_norm(n, dtype, node.attrs["eps"], residual), node)
    if residual:
        return Lowered("generated", src.name, fn=lambda args, sym: list(src(*args)))
    return Lowered("generated", src.name, fn=lambda args, sym: [src(*args)])


@TABLE.register("act.swiglu")
def _swiglu(ctx, node):
    n, dtype = _width(node), node.inputs[0].dtype
    if n is None or dtype not in _FLOATS:
        return Decline(f"width {node.inputs[0].shape[-1]} / dtype {dtype} not supported by the generated kernel")
    src = ctx.generated(rowwise.swiglu(n // 2, dtype), node)
    return Lowered("generated", src.name, fn=lambda args, sym: [src(args[0])])


@TABLE.register("rope")
def _rope(ctx, node):
    x = node.inputs[0]
    dims, dtype = x.shape[2:], x.dtype
    if not all(isinstance(d, int) for d in dims) or dtype not in _FLOATS:
        return Decline(f"rope over {x.type}: head dims must be static and the dtype fp32/fp16/bf16")
    heads = 1
    for d in dims[:-1]:
        heads *= d
    inv_freq, mult = rope_frequencies(node.attrs, dims[-1])
    inv_freq = inv_freq.to(device=ctx.device, dtype=torch.float32).contiguous()
    src = ctx.generated(rope_gen.rope(dims[-1], heads, dtype, node.attrs["interleaved"], mult), node)
    scaling = node.attrs["scaling"]
    return Lowered("generated", src.name, f"{scaling} scaling" if scaling != "none" else "",
                   fn=lambda args, sym: [src(args[0], args[1], inv_freq)])
