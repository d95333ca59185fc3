"""Normalisation ops: RMSNorm and the fused residual-add + RMSNorm."""
from __future__ import annotations

import torch

from .common import expect_float, f32, same_dtype
from .registry import Attr, defop, expect

RMS = defop("norm.rms", "x weight", {"eps": Attr(float, 1e-6)},
            "RMSNorm over the last dim, computed in fp32 as in LLaMA/DeepSeek: x * rsqrt(mean(x^2) + eps) * weight.",
            level="domain")


@RMS.infer
def _(x, w, eps):
    expect_float(x, "norm.rms input")
    expect(w.shape == (x.shape[-1],), f"norm.rms weight must be [{x.shape[-1]}], got {w}")
    same_dtype(x, w)
    return x


@RMS.reference
def rms_norm_ref(x, w, eps):
    xf = f32(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # HF casts back to the input dtype before the weight multiply; in fp32 this is exact.
    return f32(w) * y.to(x.dtype).float()


@RMS.decomposition
def _(b, x, w, eps):
    xf = b.cast(x, dtype="float32")
    ms = b.mean(b.mul(xf, xf), dims=(-1,), keepdim=True)
    y = b.mul(xf, b.rsqrt(b.add(ms, b.constant(value=eps))))
    return b.mul(b.cast(y, dtype=x.dtype), w)


ADD_RMS = defop("norm.add_rms", "x residual weight", {"eps": Attr(float, 1e-6)},
                "Fused residual add + RMSNorm: returns (rms_norm(x + residual), x + residual).",
                num_outputs=2, level="domain")


@ADD_RMS.infer
def _(x, r, w, eps):
    expect(x.shape == r.shape, f"norm.add_rms: x {x} and residual {r} differ")
    same_dtype(x, r)
    expect(w.shape == (x.shape[-1],), f"norm.add_rms weight must be [{x.shape[-1]}], got {w}")
    return x, x


@ADD_RMS.reference
def _(x, r, w, eps):
    s = (f32(x) + f32(r)).to(x.dtype)
    return rms_norm_ref(s, w, eps), s


@ADD_RMS.decomposition
def _(b, x, r, w, eps):
    s = b.add(x, r)
    return b.norm.rms(s, w, eps=eps), s

