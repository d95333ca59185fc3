"""Generated row kernels for norm.rms, norm.add_rms, act.swiglu and rope (see codegen/rowwise.py, rope.py); absorbed
MLA's cache row, `mla.latent_row`, lowers in mla_rows.py."""
from __future__ import annotations

import torch
from dsgraph.backends.lowering import Decline

from dsgraph.ops.rope import rope_frequencies

from ..codegen import rope as rope_gen
from ..codegen import rowwise
from .registry import TABLE, Lowered

_FLOATS = ("float32", "float16", "bfloat16")


def _width(node) -> int | None:
    d = node.inputs[0].shape[-1]
    return d if isinstance(d, int) else None


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
