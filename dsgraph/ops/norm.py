"""Normalisation ops: RMSNorm, the fused residual-add + RMSNorm, and LayerNorm."""
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



LAYER = defop("norm.layer", "x weight bias", {"eps": Attr(float, 1e-6)},
              "LayerNorm over the last dim (mean and variance), in fp32: V3.2's indexer key norm `k_norm`.",
              level="domain")


@LAYER.infer
def _(x, w, bias, eps):
    expect_float(x, "norm.layer input")
    expect(w.shape == (x.shape[-1],) and bias.shape == (x.shape[-1],),
           f"norm.layer weight and bias must be [{x.shape[-1]}], got {w} and {bias}")
    same_dtype(x, w, bias)
    return x


@LAYER.reference
def _(x, w, bias, eps):
    return torch.nn.functional.layer_norm(f32(x), (x.shape[-1],), f32(w), f32(bias), eps)


@LAYER.decomposition
def _(b, x, w, bias, eps):
    xf = b.cast(x, dtype="float32")
    centred = b.sub(xf, b.mean(xf, dims=(-1,), keepdim=True))
    var = b.mean(b.mul(centred, centred), dims=(-1,), keepdim=True)
    y = b.mul(centred, b.rsqrt(b.add(var, b.constant(value=eps))))
    y = b.add(b.mul(y, b.cast(w, dtype="float32")), b.cast(bias, dtype="float32"))
    return b.cast(y, dtype=x.dtype)


RMS_PLAIN = defop("norm.rms_unweighted", "x", {"eps": Attr(float, 1e-6)},
                  "RMSNorm without a weight (V4's per-head query norm): x * rsqrt(mean(x^2) + eps), in fp32.",
                  level="domain")


@RMS_PLAIN.infer
def _(x, eps):
    expect_float(x, "norm.rms_unweighted input")
    return x


@RMS_PLAIN.reference
def _(x, eps):
    xf = f32(x)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


@RMS_PLAIN.decomposition
def _(b, x, eps):
    xf = b.cast(x, dtype="float32")
    y = b.mul(xf, b.rsqrt(b.add(b.mean(b.mul(xf, xf), dims=(-1,), keepdim=True), b.constant(value=eps))))
    return y if x.dtype == "float32" else b.cast(y, dtype=x.dtype)
