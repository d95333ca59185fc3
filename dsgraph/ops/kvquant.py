"""FP8 KV-cache rows: per-token, per-group e4m3 quantisation of the latent cache's NoPE part and its inverse.

FlashMLA's FP8 sparse-decode cache stores, per token, 512 e4m3 values, 4 fp32 scales (one per 128 values) and the 64
RoPE values in bf16: 656 bytes instead of 1152 in bf16. `kv.quant_fp8` makes the first two of that row (the
`fp8_latent_cache` pass stores them as two caches beside a RoPE cache); `kv.dequant_fp8` reads them back for an
attention kernel that does not read FP8 itself. Scales are amax / 448 per group (448: e4m3's largest finite value).
"""
from __future__ import annotations

import torch

from ..types import TensorType
from .common import expect_float, f32
from .registry import Attr, defop, expect

E4M3_MAX = 448.0
GROUP = {"group": Attr(int, 128)}


def _groups(width, group: int, what: str) -> int:
    expect(isinstance(width, int) and group > 0 and width % group == 0,
           f"{what}: row width {width} is not a multiple of group {group}")
    return width // group


QUANT = defop("kv.quant_fp8", "x", GROUP,
              "Rows x [..., C] -> (e4m3 [..., C], fp32 scales [..., C/group]): each group of `group` values divided "
              "by its amax / 448.", num_outputs=2, level="domain")


@QUANT.infer
def _(x, group):
    expect_float(x, "kv.quant_fp8 input")
    n = _groups(x.shape[-1], group, "kv.quant_fp8")
    return x.with_dtype("float8_e4m3fn"), TensorType(x.shape[:-1] + (n,), "float32")


@QUANT.reference
def _(x, group):
    g = f32(x).unflatten(-1, (-1, group))
    amax = g.abs().amax(-1).clamp(min=1e-12)
    # A tensor divisor: torch on CUDA turns `t / python_scalar` into t * (1 / scalar), one ulp off IEEE division
    # (what the CPU and the generated kernels compute), so the scales would depend on the device.
    scale = amax / torch.full_like(amax, E4M3_MAX)
    return (g / scale[..., None]).flatten(-2).to(torch.float8_e4m3fn), scale


@QUANT.decomposition
def _(b, x, group):
    shape = x.shape
    n = shape[-1] // group
    g = b.reshape(b.cast(x, dtype="float32"), shape=shape[:-1] + (n, group))
    scale = b.div(b.maximum(b.amax(b.abs(g), dims=(-1,)), b.constant(value=1e-12)), b.constant(value=E4M3_MAX))
    q = b.div(g, b.reshape(scale, shape=shape[:-1] + (n, 1)))
    return b.cast(b.reshape(q, shape=shape), dtype="float8_e4m3fn"), scale


DEQUANT = defop("kv.dequant_fp8", "q scale", {**GROUP, "dtype": Attr(str, "float32")},
                "e4m3 rows [..., C] times their group scales [..., C/group] -> [..., C] in `dtype`.", level="domain")


@DEQUANT.infer
def _(q, scale, group, dtype):
    expect(q.dtype == "float8_e4m3fn", f"kv.dequant_fp8: rows must be float8_e4m3fn, got {q}")
    n = _groups(q.shape[-1], group, "kv.dequant_fp8")
    expect(scale.dtype == "float32" and scale.shape == q.shape[:-1] + (n,),
           f"kv.dequant_fp8: scales must be float32 [..., {n}] of rows {q}, got {scale}")
    return q.with_dtype(dtype)


@DEQUANT.reference
def _(q, scale, group, dtype):
    return (q.float().unflatten(-1, (-1, group)) * scale[..., None]).flatten(-2)


@DEQUANT.decomposition
def _(b, q, scale, group, dtype):
    shape = q.shape
    n = shape[-1] // group
    g = b.reshape(b.cast(q, dtype="float32"), shape=shape[:-1] + (n, group))
    out = b.reshape(b.mul(g, b.reshape(scale, shape=shape[:-1] + (n, 1))), shape=shape)
    return out if dtype == "float32" else b.cast(out, dtype=dtype)
