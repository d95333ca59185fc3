"""Generated row kernels for norm.rms, norm.add_rms, act.swiglu and rope (see codegen/rowwise.py, rope.py)."""
from __future__ import annotations

import torch

from dsgraph.ops.rope import rope_frequencies

from ..codegen import rope as rope_gen
from ..codegen import rowwise
from .registry import Decline, Lowered, lowering

_FLOATS = ("float32", "float16", "bfloat16")


def _width(node) -> int | None:
    d = node.inputs[0].shape[-1]
    return d if isinstance(d, int) else None


@lowering("norm.rms")
def _mla_cache_row(node, ctx):
    """Absorbed MLA's cache row, concat(norm.rms(c_kv), reshape(rope(reshape(k_pe)))) as `absorb_mla` builds it,
    in one generated kernel instead of three launches (RMSNorm, RoPE, concat). Claimed from the RMSNorm, the
    region's first node; every value inside it must feed only the next node."""
    cat = ctx.sole_user(node.outputs[0])
    flat = cat.inputs[1].node if cat is not None and cat.op == "concat" and len(cat.inputs) == 2 else None
    rope = flat.inputs[0].node if flat is not None and flat.op == "reshape" else None
    heads = rope.inputs[0].node if rope is not None and rope.op == "rope" else None
    if heads is None or heads.op != "reshape" or cat.inputs[0] is not node.outputs[0]:
        return None
    chain = [node, heads, rope, flat, cat]
    rank, dim, dtype = node.inputs[0].shape[-1], heads.inputs[0].shape[-1], node.inputs[0].dtype
    if (not all(isinstance(d, int) for d in (rank, dim)) or dtype not in _FLOATS or rope.inputs[0].shape[-2] != 1
            or cat.attrs["dim"] not in (-1, len(cat.outputs[0].shape) - 1)
            or any(ctx.sole_user(a.outputs[0]) is not b for a, b in ((heads, rope), (rope, flat), (flat, cat)))
            or not all(ctx.free(n) for n in chain[1:]) or not ctx.region_ok(chain)):
        return None
    inv_freq, mult = rope_frequencies(rope.attrs, dim)
    inv_freq = inv_freq.to(device=ctx.device, dtype=torch.float32).contiguous()
    src = ctx.generated(rope_gen.mla_cache_row(rank, dim, dtype, node.attrs["eps"], rope.attrs["interleaved"], mult),
                        *chain)
    return Lowered(lambda a, sym: [src(a[0], a[1], a[2], a[3], inv_freq)], "generated", src.name, nodes=tuple(chain),
                   inputs=(node.inputs[0], heads.inputs[0], node.inputs[1], rope.inputs[1]), outputs=cat.outputs)


@lowering("norm.rms", "norm.add_rms")
def _rms(node, ctx):
    n, dtype = _width(node), node.inputs[0].dtype
    if n is None or dtype not in _FLOATS:
        return Decline(f"row width {node.inputs[0].shape[-1]} / dtype {dtype} not supported by the generated kernel")
    residual = node.op == "norm.add_rms"
    src = ctx.generated(rowwise.rms_norm(n, dtype, node.attrs["eps"], residual), node)
    if residual:
        return Lowered(lambda args, sym: list(src(*args)), "generated", src.name)
    return Lowered(lambda args, sym: [src(*args)], "generated", src.name)


@lowering("act.swiglu")
def _swiglu(node, ctx):
    n, dtype = _width(node), node.inputs[0].dtype
    if n is None or dtype not in _FLOATS:
        return Decline(f"width {node.inputs[0].shape[-1]} / dtype {dtype} not supported by the generated kernel")
    src = ctx.generated(rowwise.swiglu(n // 2, dtype), node)
    return Lowered(lambda args, sym: [src(args[0])], "generated", src.name)


@lowering("rope")
def _rope(node, ctx):
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
    return Lowered(lambda args, sym: [src(args[0], args[1], inv_freq)], "generated", src.name,
                   f"{scaling} scaling" if scaling != "none" else "")
