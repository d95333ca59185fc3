"""Rotary position embedding with default, linear, YaRN and llama3 frequency scaling,
in the half-split (LLaMA/Qwen) or interleaved (DeepSeek-V2/V3 checkpoints) layout.

`rope_frequencies(attrs, dim)` is the single source of the inverse frequencies and
the cos/sin multiplier (YaRN's mscale ratio); backends reuse it for their tables.
"""
from __future__ import annotations

import math

import torch

from .common import expect_float, expect_int, f32
from .registry import Attr, defop, expect

ROPE_ATTRS = {
    "theta": Attr(float, 10000.0),
    "scaling": Attr(str, "none", ("none", "linear", "yarn", "llama3")),
    "factor": Attr(float, 1.0),
    "original_max_position_embeddings": Attr(int, 4096),
    "beta_fast": Attr(float, 32.0),
    "beta_slow": Attr(float, 1.0),
    "mscale": Attr(float, 1.0),
    "mscale_all_dim": Attr(float, 0.0),
    "low_freq_factor": Attr(float, 1.0),
    "high_freq_factor": Attr(float, 4.0),
    "interleaved": Attr(bool, False),
}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(attrs: dict, dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2] fp32, multiplier applied to cos and sin)."""
    theta, kind, factor = attrs["theta"], attrs["scaling"], attrs["factor"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    mult = 1.0
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "yarn":
        orig = attrs["original_max_position_embeddings"]

        def corr_dim(rot):
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

        low = max(math.floor(corr_dim(attrs["beta_fast"])), 0)
        high = min(math.ceil(corr_dim(attrs["beta_slow"])), dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        if attrs["mscale"] and attrs["mscale_all_dim"]:
            mult = yarn_mscale(factor, attrs["mscale"]) / yarn_mscale(factor, attrs["mscale_all_dim"])
        else:
            mult = yarn_mscale(factor)
    elif kind == "llama3":
        orig = attrs["original_max_position_embeddings"]
        lo, hi = attrs["low_freq_factor"], attrs["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > orig / lo, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < orig / hi) & ~(wavelen > orig / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq, mult


ROPE = defop("rope", "x positions", ROPE_ATTRS,
             "Rotate the last dim of x [B, S, ..., D] by the angle positions[b, s] * inv_freq. "
             "interleaved=True rotates adjacent pairs (2i, 2i+1), else the halves (i, i+D/2).",
             level="domain")


@ROPE.infer
def _(x, positions, **attrs):
    expect_float(x, "rope input")
    expect_int(positions, "rope positions")
    expect(x.rank >= 3 and positions.shape == x.shape[:2],
           f"rope: positions must be [B, S] matching x [B, S, ..., D]; got x {x}, positions {positions}")
    expect(isinstance(x.shape[-1], int) and x.shape[-1] % 2 == 0, f"rope: last dim of {x} must be even")
    return x


def rope_cos_sin(positions: torch.Tensor, attrs: dict, dim: int, extra_dims: int):
    inv_freq, mult = rope_frequencies(attrs, dim)
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    shape = freqs.shape[:2] + (1,) * extra_dims + freqs.shape[2:]
    return (freqs.cos() * mult).reshape(shape), (freqs.sin() * mult).reshape(shape)


@ROPE.reference
def rope_ref(x, positions, **attrs):
    xf = f32(x)
    cos, sin = rope_cos_sin(positions, attrs, x.shape[-1], x.dim() - 3)
    if attrs["interleaved"]:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@ROPE.decomposition
def _(b, x, positions, **attrs):
    """fp32 angle table from a constant inv_freq, then the rotation of the chosen layout."""
    d = x.shape[-1]
    inv_freq, mult = rope_frequencies(attrs, d)
    lead = x.shape[:2] + (1,) * (len(x.shape) - 3)
    pos = b.reshape(b.cast(positions, dtype="float32"), shape=lead + (1,))
    freqs = b.mul(pos, b.constant(value=tuple(inv_freq.tolist()), shape=(d // 2,)))
    cos, sin = b.cos(freqs), b.sin(freqs)
    if mult != 1.0:
        cos, sin = b.mul(cos, b.constant(value=mult)), b.mul(sin, b.constant(value=mult))
    xf = x if x.dtype == "float32" else b.cast(x, dtype="float32")
    if attrs["interleaved"]:
        pairs = b.reshape(xf, shape=x.shape[:-1] + (d // 2, 2))
        x1, x2 = b.split(pairs, sizes=(1, 1), dim=-1)
        cos, sin = b.reshape(cos, shape=lead + (d // 2, 1)), b.reshape(sin, shape=lead + (d // 2, 1))
    else:
        x1, x2 = b.split(xf, sizes=(d // 2, d // 2), dim=-1)
    y1 = b.sub(b.mul(x1, cos), b.mul(x2, sin))
    y2 = b.add(b.mul(x2, cos), b.mul(x1, sin))
    y = b.concat(y1, y2, dim=-1)
    if attrs["interleaved"]:
        y = b.reshape(y, shape=x.shape)
    return y if x.dtype == "float32" else b.cast(y, dtype=x.dtype)
