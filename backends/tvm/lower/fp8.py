"""FP8 e4m3 weights: decoding and block dequantisation as TE functions.

TVM 0.27's own float8_e4m3fn -> float32 cast treats subnormals (exponent 0) as normals and 0x7f as 480
instead of NaN, and real FP8 checkpoints hold subnormals; so the bits are decoded here, exactly:
(-1)^s * (e == 0 ? m/8 * 2^-6 : (1 + m/8) * 2^(e-7)), with S.1111.111 = NaN (e4m3fn has no infinities).
"""
from __future__ import annotations

from ..deps import te, tirx
from .linalg import linear
from .registry import TABLE, Lowered

FP8 = "float8_e4m3fn"


def fp8_to_f32(v):
    bits = tirx.reinterpret("uint8", v).astype("int32")
    e = (bits >> 3) & 15
    m = (bits & 7).astype("float32")
    mag = tirx.Select(e == 0, m * (2.0 ** -9), (m * 0.125 + 1.0) * tirx.exp2((e - 7).astype("float32")))
    mag = tirx.Select((bits & 127) == 127, tirx.const(float("nan"), "float32"), mag)
    return tirx.Select((bits & 128) != 0, -mag, mag)


def decode_te(x, out_dtype: str):
    return te.compute(x.shape, lambda *i: fp8_to_f32(x[i]).astype(out_dtype), name="fp8_decode")


def dequant_fp8_te(w, s, block):
    bn, bk = block
    return te.compute(w.shape, lambda i, j: fp8_to_f32(w[i, j]) * s[i // bn, j // bk].astype("float32"),
                      name="dequant_fp8")


@TABLE.register("dequant_fp8")
def _(ctx, node):
    w, s = ctx.inputs(node)
    return Lowered("tir", "te.dequant_fp8 (exact e4m3 decode, block scales)",
                   outputs=[ctx.emit_te(dequant_fp8_te, w, s, node.attrs["block"], name="dequant_fp8")])


@TABLE.register("linear_fp8")
def _(ctx, node):
    x, w, s = ctx.inputs(node)
    wf = ctx.emit_te(dequant_fp8_te, w, s, node.attrs["block"], name="dequant_fp8")
    y = linear(ctx, ctx.f32(x), wf, out_dtype=node.outputs[0].dtype)
    return Lowered("tir", "te.dequant_fp8 + te.nt_matmul", "weights dequantised on every call (no FP8 GEMM)",
                   outputs=[y])
