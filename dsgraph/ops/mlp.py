"""Feed-forward ops: SwiGLU MLP, its activation alone, the MTP branch input, FP8 block linear."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..types import TensorType
from .common import expect_float, f32, same_dtype
from .moe import swiglu_ref
from .norm import rms_norm_ref
from .registry import Attr, defop, expect

SWIGLU = defop("mlp.swiglu", "x gate_weight up_weight down_weight", {},
               "LLaMA/DeepSeek MLP: down(silu(gate(x)) * up(x)).", level="domain")


@SWIGLU.infer
def _(x, g, u, d):
    expect(g.rank == 2 and g.shape[1] == x.shape[-1] and u.shape == g.shape,
           f"mlp.swiglu: gate {g} / up {u} must be [I, {x.shape[-1]}]")
    expect(d.shape == (x.shape[-1], g.shape[0]), f"mlp.swiglu: down must be [{x.shape[-1]}, {g.shape[0]}], got {d}")
    same_dtype(x, g, u, d)
    return x


SWIGLU.reference(swiglu_ref)


@SWIGLU.decomposition
def _(b, x, g, u, d):
    return b.linear(b.mul(b.silu(b.linear(x, g)), b.linear(x, u)), d)


ACT = defop("act.swiglu", "gate_up", {}, "silu(gate_up[..., :I]) * gate_up[..., I:] for a fused gate|up GEMM.")


@ACT.infer
def _(gu):
    expect_float(gu, "act.swiglu input")
    i2 = gu.shape[-1]
    expect(isinstance(i2, int) and i2 % 2 == 0, f"act.swiglu: last dim of {gu} must be even")
    return TensorType(gu.shape[:-1] + (i2 // 2,), gu.dtype)


@ACT.reference
def _(gu):
    g, u = f32(gu).chunk(2, dim=-1)
    return F.silu(g) * u


@ACT.decomposition
def _(b, gu):
    half = gu.shape[-1] // 2
    g, u = b.split(gu, sizes=(half, half), dim=-1)
    return b.mul(b.silu(g), u)


MTP = defop("mtp.branch", "hidden embedded enorm_weight hnorm_weight eh_proj_weight", {"eps": Attr(float, 1e-6)},
            "DeepSeek-V3 MTP input: eh_proj(concat(enorm(embed(token t+1)), hnorm(hidden_t))) -> [.., D]; "
            "a decoder block and the shared head follow as ordinary ops.", level="domain")


@MTP.infer
def _(h, e, en, hn, w, eps):
    d = h.shape[-1]
    expect(e.shape == h.shape, f"mtp.branch: embedded {e} must match hidden {h}")
    expect(en.shape == (d,) and hn.shape == (d,), f"mtp.branch: norm weights must be [{d}]")
    expect(w.shape == (d, 2 * d), f"mtp.branch: eh_proj must be [{d}, 2*{d}], got {w}")
    same_dtype(h, e, en, hn, w)
    return h


@MTP.reference
def _(h, e, en, hn, w, eps):
    cat = torch.cat((rms_norm_ref(e, en, eps).to(h.dtype), rms_norm_ref(h, hn, eps).to(h.dtype)), dim=-1)
    return F.linear(f32(cat), f32(w))


@MTP.decomposition
def _(b, h, e, en, hn, w, eps):
    return b.linear(b.concat(b.norm.rms(e, en, eps=eps), b.norm.rms(h, hn, eps=eps), dim=-1), w)


BAND_ELEMENTS = 1 << 24  # dequantise at most this many weights at once


def dequant_fp8_block(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e4m3 [N, K] with one fp32 scale per (bn x bk) block (edge blocks partial) -> `out_dtype`, a band of block
    rows at a time when the weight is large (a stacked V3 expert weight in fp32 would take 28 GiB)."""
    bn, bk = block
    n, k = w.shape
    band = max(bn, BAND_ELEMENTS // max(k, 1) // bn * bn)
    if band >= n:
        return (w.float() * _block_scales(scale_inv, bn, bk, n, k)).to(out_dtype)
    out = torch.empty((n, k), dtype=out_dtype, device=w.device)
    for r0 in range(0, n, band):
        r1 = min(n, r0 + band)
        out[r0:r1] = w[r0:r1].float() * _block_scales(scale_inv[r0 // bn:-(-r1 // bn)], bn, bk, r1 - r0, k)
    return out


def _block_scales(scale_inv, bn, bk, n, k):
    return scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


LINEAR_FP8 = defop("linear_fp8", "x weight scale_inv", {"block": Attr(tuple, (128, 128))},
                   "x @ dequant(weight).T for an FP8 e4m3 weight [N, K] with block scales "
                   "[ceil(N/bn), ceil(K/bk)] (DeepSeek-V3's weight_scale_inv).", level="domain")


@LINEAR_FP8.infer
def _(x, w, s, block):
    expect(w.dtype == "float8_e4m3fn", f"linear_fp8 weight must be float8_e4m3fn, got {w}")
    expect(w.rank == 2 and w.shape[1] == x.shape[-1], f"linear_fp8: weight {w} does not fit x {x}")
    bn, bk = block
    n, k = w.shape
    expect(isinstance(n, int) and isinstance(k, int) and s.shape == (-(-n // bn), -(-k // bk)),
           f"linear_fp8: scales must be [{-(-n // bn)}, {-(-k // bk)}] for {w} in {block} blocks, got {s}")
    expect(s.dtype == "float32", f"linear_fp8 scales must be float32, got {s}")
    expect_float(x, "linear_fp8 input")
    return TensorType(x.shape[:-1] + (n,), x.dtype)


@LINEAR_FP8.reference
def _(x, w, s, block):
    return F.linear(f32(x), dequant_fp8_block(w, s, block))


DEQUANT_FP8 = defop("dequant_fp8", "weight scale_inv", {"block": Attr(tuple, (128, 128))},
                    "FP8 e4m3 weight [N, K] times its block scales [ceil(N/bn), ceil(K/bk)] -> fp32 [N, K]. "
                    "Models feed it to any op that takes a weight; `fuse_fp8_linear` turns "
                    "linear(x, dequant_fp8(w, s)) into linear_fp8 for backends with an FP8 GEMM.",
                    level="domain")


@DEQUANT_FP8.infer
def _(w, s, block):
    expect(w.dtype == "float8_e4m3fn" and w.rank == 2,
           lambda: f"dequant_fp8 weight must be float8_e4m3fn [N, K], got {w}")
    bn, bk = block
    n, k = w.shape
    expect(s.shape == (-(-n // bn), -(-k // bk)) and s.dtype == "float32",
           lambda: f"dequant_fp8: scales must be float32[{-(-n // bn)}, {-(-k // bk)}] for {w} in {block} blocks, "
                   f"got {s}")
    return TensorType(w.shape, "float32")


DEQUANT_FP8.reference(lambda w, s, block: dequant_fp8_block(w, s, block))


def _dequant_decomposition(b, w, s, block):
    """fp32 weight times its block scales broadcast to [N, K]: [nb,1,kb,1] -> [nb,bn,kb,bk] -> cut the edges."""
    bn, bk = block
    (n, k), (nb, kb) = w.shape, s.shape
    full = b.reshape(b.expand(b.reshape(s, shape=(nb, 1, kb, 1)), shape=(nb, bn, kb, bk)), shape=(nb * bn, kb * bk))
    if nb * bn != n:
        full = b.slice(full, dim=0, start=0, end=n)
    if kb * bk != k:
        full = b.slice(full, dim=1, start=0, end=k)
    return b.mul(b.cast(w, dtype="float32"), full)


DEQUANT_FP8.decomposition(_dequant_decomposition)


@LINEAR_FP8.decomposition
def _(b, x, w, s, block):
    xf = x if x.dtype == "float32" else b.cast(x, dtype="float32")
    y = b.linear(xf, _dequant_decomposition(b, w, s, block))
    return y if x.dtype == "float32" else b.cast(y, dtype=x.dtype)
