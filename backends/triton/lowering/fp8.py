"""`linear_fp8` (what the `fuse_fp8_linear` pass makes of a linear over a dequantised FP8 weight) on the FP8 block
GEMM template.

Activation quantisation (w8a8) is DeepSeek's inference numerics and what Hopper's fp8 tensor cores want; it is
on by default on GPUs with fp8 support (compute capability >= 8.9) and off elsewhere, where the weight tile is
dequantised in registers instead (w8a16, the `linear_fp8` reference's numerics). Option `fp8_act_quant` pins it.
"""
from __future__ import annotations

import torch
from dsgraph.backends.lowering import Decline

from ..kernels.fp8_gemm import fp8_linear
from .registry import TABLE, Lowered


def _act_quant(ctx) -> bool:
    opt = ctx.options.get("fp8_act_quant")
    if opt is not None:
        return bool(opt)
    return ctx.device.type == "cuda" and torch.cuda.get_device_capability(ctx.device) >= (8, 9)


@TABLE.register("linear_fp8")
def _(ctx, node):
    x = node.inputs[0]
    block = tuple(node.attrs["block"])
    bk = block[1]
    if bk < 16 or bk & (bk - 1):
        return Decline(f"FP8 K block {bk} is not a power of two >= 16")
    if ctx.interpreting and x.dtype == "bfloat16":
        return Decline("Triton's interpreter computes bf16 tl.dot wrongly; bf16 FP8 GEMM runs on CUDA")
    quant = _act_quant(ctx)
    mode = "w8a8, per-token-group activation quantisation" if quant else "w8a16"
    return Lowered("template", "fp8_gemm._fp8_gemm_kernel", f"{mode}, {block[0]}x{block[1]} weight blocks",
                   fn=lambda a, sym: [fp8_linear(a[0], a[1], a[2], block, quant)])
