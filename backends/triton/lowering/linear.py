"""GEMMs: cuBLAS through torch (a recorded `library` choice: it beats a generic Triton GEMM at these shapes),
except decode's few-row GEMVs, which take the `gemv` template on CUDA (option `gemv`), and the composite domain
ops built around GEMMs. FP8 GEMMs are `linear_fp8` (fp8.py), made by the `fuse_fp8_linear` pass; SwiGLU's one
gate|up GEMM is made by `fuse_swiglu`. The unfused forms decline here and say which pass to run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from dsgraph.backends.lowering import Decline
from dsgraph.passes.mla import O_ABS
from dsgraph.passes.weightref import weight_ref

from dsgraph.dtypes import to_torch

from ..codegen import rowwise
from ..kernels.gemv import GEMV_ROWS, gemv, head_gemv
from .registry import TABLE, Lowered

CUBLAS = "torch.nn.functional.linear (cuBLAS on CUDA)"
GEMV = f"gemv._gemv_kernel (<= {GEMV_ROWS} rows; more: {CUBLAS})"


def _gemv_tune(ctx) -> bool | None:
    """None when few-row projections stay with cuBLAS, else whether the GEMV template tunes its tiles. Option
    `gemv` defaults on for CUDA (it beat cuBLAS at 5 of V2-Lite's 6 decode projections) and off on the
    interpreter, where it would only add per-launch cost; tiles are tuned per shape on a GPU."""
    return not ctx.interpreting if ctx.options.get("gemv", not ctx.interpreting) else None


def _dense(ctx):
    """(linear function, kernel description, kind): the GEMV template for calls with <= GEMV_ROWS rows where
    `_gemv_tune` allows it, else cuBLAS."""
    tune = _gemv_tune(ctx)
    if tune is None:
        return F.linear, CUBLAS, "library"

    def linear(x, w, b=None):
        return gemv(x, w, b, tune=tune) if x.numel() <= GEMV_ROWS * x.shape[-1] else F.linear(x, w, b)
    return linear, GEMV, "template"


@TABLE.register("linear")
def _linear(ctx, node):
    ref = weight_ref(node.inputs[1])
    if ref is not None and ref.s is not None and len(node.inputs) == 2:
        return Decline("linear over a dequantised FP8 weight: run fuse_fp8_linear first (it makes linear_fp8, "
                       "the FP8 block GEMM template, without a dequantised copy of the weight)")
    dt = to_torch(node.outputs[0].dtype)
    dense, how, kind = _dense(ctx)
    return Lowered(kind, how, fn=lambda a, sym: [dense(a[0], a[1], a[2] if len(a) > 2 else None).to(dt)])


@TABLE.register("matmul")
def _(ctx, node):
    return Lowered("library", "torch.matmul (cuBLAS on CUDA)", fn=lambda a, sym: [torch.matmul(a[0], a[1])])


@TABLE.register("einsum")
def _(ctx, node):
    """torch.einsum (cuBLAS), except MLA's output absorb einsum (O_ABS, W_UV [H, D, C] contracting C: [H, N, K]
    row-major as stored) at <= GEMV_ROWS rows, which takes `head_gemv`: H100, V2-Lite's 16 heads, 2.4 us
    against cuBLAS's 3.0-3.1. The query absorb (Q_ABS, contracting D) stays with cuBLAS, which won there at
    2.7-2.8 us against 3.2 (W_UK read column-major) and 3.5 (transposed at compile time)."""
    eq = node.attrs["equation"]
    library = f"torch.einsum {eq!r} (cuBLAS bmm)"
    tune = _gemv_tune(ctx)
    if eq != O_ABS or tune is None:
        return Lowered("library", library, fn=lambda a, sym: [torch.einsum(eq, a[0], a[1])])

    def run(a, sym):
        x, w = a
        few = x.numel() <= GEMV_ROWS * x.shape[-1] * x.shape[-2]
        return [head_gemv(x, w, tune=tune) if few else torch.einsum(eq, x, w)]
    return Lowered("template", f"gemv._gemv_kernel per head (<= {GEMV_ROWS} rows; more: {library})", fn=run)


@TABLE.register("mlp.swiglu")
def _mlp(ctx, node):
    return Decline("mlp.swiglu: run fuse_swiglu first (it stacks gate|up into one GEMM's weight, then the "
                   "generated act.swiglu and the down GEMM lower on their own)")


@TABLE.register("mla.latent_proj")
def _latent(ctx, node):
    """kv_a GEMM (library) then the generated RMSNorm on the latent half; k_pe is a view."""
    x, w, nw = node.inputs
    rank, eps = node.attrs["kv_lora_rank"], node.attrs["eps"]
    rms = ctx.generated(rowwise.rms_norm(rank, x.dtype, eps, residual=False), node)
    dense, how, kind = _dense(ctx)

    def run(a, sym):
        kv = dense(a[0], a[1])
        c, k_pe = kv.split([rank, kv.shape[-1] - rank], dim=-1)
        return [rms(c, a[2]), k_pe]
    return Lowered(kind, f"{how} + generated {rms.name}", fn=run)


@TABLE.register("mla.decompress")
def _decompress(ctx, node):
    h, dn, dv = node.attrs["num_heads"], node.attrs["qk_nope_dim"], node.attrs["v_dim"]

    def run(a, sym):
        c, k_pe, w = a
        kv = F.linear(c, w).view(c.shape[0], c.shape[1], h, dn + dv)
        k_nope, v = kv.split([dn, dv], dim=-1)
        return [torch.cat((k_nope, k_pe.expand(-1, -1, h, -1)), dim=-1), v]
    return Lowered("library", f"{CUBLAS} kv_b + torch.cat of the rope key", fn=run)


@TABLE.register("mtp.branch")
def _mtp(ctx, node):
    h, e, en, hn, w = node.inputs
    d, eps = h.shape[-1], node.attrs["eps"]
    rms = ctx.generated(rowwise.rms_norm(d, h.dtype, eps, residual=False), node)
    return Lowered("library", f"generated {rms.name} x2 + {CUBLAS} eh_proj",
                   fn=lambda a, sym: [F.linear(torch.cat((rms(a[1], a[2]), rms(a[0], a[3])), dim=-1), a[4])])
