"""DeepSeek-V3.2-Exp's FP8 indexer numerics (`inference/model.py`: `rotate_activation`, then `act_quant` with
`scale_fmt="ue8m0"`), for `indexer.logits(fp8=True)`: q and k are rotated by the orthonormal Hadamard matrix
(Sylvester order, scale D**-0.5), then rounded to e4m3 per group of 128 values (the whole row when narrower) with a
power-of-two scale 2**ceil(log2(max(amax, 1e-4) / 448)). The scores are computed on the dequantised values, which
equals the reference's fp8 dot times the q and k scales (both positive, so they pass through the ReLU).
"""
from __future__ import annotations

import math

import torch

E4M3_MAX, AMAX_MIN, GROUP = 448.0, 1e-4, 128


def hadamard(d: int, device=None) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order d (a power of two), unnormalised, built where it is used."""
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < d:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def rotate_quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 [..., D], fp32 scales [..., D / min(GROUP, D)]) of its Hadamard rotation: the
    reference's `act_quant(rotate_activation(x))`, the inputs of its `fp8_index` kernel."""
    d = x.shape[-1]
    y = (x.float() @ hadamard(d, x.device)) * d ** -0.5
    g = y.unflatten(-1, (-1, min(GROUP, d)))
    s = torch.exp2(torch.ceil(torch.log2(g.abs().amax(-1, keepdim=True).clamp(min=AMAX_MIN) / E4M3_MAX)))
    return (g / s).to(torch.float8_e4m3fn).flatten(-2), s.squeeze(-1)


def rotate_quant_ref(x: torch.Tensor) -> torch.Tensor:
    """fp32 x [..., D] -> the dequantised e4m3 rows of its Hadamard rotation."""
    q, s = rotate_quant_rows(x)
    return (q.float().unflatten(-1, (s.shape[-1], -1)) * s[..., None]).flatten(-2)


def _pow2_ceil(b, s):
    """2**ceil(log2(s)) in primitives: truncation toward zero by an int cast, plus one where that fell short; exp's
    last-bit error is snapped away by rounding to bf16 (a power of two is exact there)."""
    e = b.mul(b.log(s), b.constant(value=1 / math.log(2)))
    t = b.cast(b.cast(e, dtype="int64"), dtype="float32")
    up = b.where(b.gt(e, t), b.constant(value=1.0), b.constant(value=0.0))
    p = b.exp(b.mul(b.add(t, up), b.constant(value=math.log(2))))
    return b.cast(b.cast(p, dtype="bfloat16"), dtype="float32")


def rotate_quant_parts(b, x):
    """rotate_quant_rows in primitives: log2(D) butterfly stages (pairs h apart -> [a + b, a - b]), then e4m3
    groups [..., D/group, group] and their scales [..., D/group, 1]."""
    *lead, d = x.shape
    y = b.cast(x, dtype="float32")
    h = d // 2
    while h >= 1:
        pairs = b.reshape(y, shape=(*lead, d // (2 * h), 2, h))
        lo, hi = b.slice(pairs, dim=-2, start=0, end=1), b.slice(pairs, dim=-2, start=1, end=2)
        y = b.reshape(b.concat(b.add(lo, hi), b.sub(lo, hi), dim=-2), shape=(*lead, d))
        h //= 2
    group = min(GROUP, d)
    g = b.reshape(b.mul(y, b.constant(value=d ** -0.5)), shape=(*lead, d // group, group))
    amax = b.maximum(b.amax(b.abs(g), dims=(-1,), keepdim=True), b.constant(value=AMAX_MIN))
    s = _pow2_ceil(b, b.div(amax, b.constant(value=E4M3_MAX)))
    return b.cast(b.div(g, s), dtype="float8_e4m3fn"), s


def rotate_quant_decomposition(b, x):
    """rotate_quant_ref in primitives."""
    q, s = rotate_quant_parts(b, x)
    return b.reshape(b.mul(b.cast(q, dtype="float32"), s), shape=x.shape)
