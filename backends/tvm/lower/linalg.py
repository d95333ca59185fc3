"""GEMMs. `linear` is a TE "NT" matmul (x [M, K] times w [N, K], the weight read in its stored layout): Relax's
own linear legalises to a transpose of the weight on every call plus an NN matmul, which doubles a decode
step's weight traffic and hides the GEMV shape from dlight. Leading dims are flattened to one row dim M, the
only symbolic extent, so the schedule step (schedule.py) can dispatch on M: GEMV for decode, Matmul for
prefill. Accumulation is fp32, rounded to the declared dtype; `matmul`/`einsum` stay Relax built-ins."""
from __future__ import annotations

from ..deps import relax, te
from .registry import TABLE, Lowered


def nt_matmul_te(x, w, bias, out_dtype: str):
    """x [M, K], w [N, K], bias [N] or None -> [M, N] = x @ w.T (+ bias), accumulated in fp32."""
    m, k = x.shape
    n = w.shape[0]
    rk = te.reduce_axis((0, k), name="k")
    acc = te.compute((m, n), lambda i, j: te.sum(x[i, rk].astype("float32") * w[j, rk].astype("float32"), axis=rk),
                     name="NT_matmul")
    if bias is not None:
        acc = te.compute((m, n), lambda i, j: acc[i, j] + bias[j].astype("float32"), name="bias_add")
    return acc if out_dtype == "float32" else te.compute((m, n), lambda i, j: acc[i, j].astype(out_dtype),
                                                         name="NT_matmul_cast")


def linear(ctx, x, w, bias=None, out_dtype: str | None = None):
    """x [..., K] @ w.T (+ bias) accumulated in fp32, cast to `out_dtype` (default: x's dtype)."""
    out_dtype = out_dtype or ctx.dtype_of(x)
    *lead, k = ctx.shape_of(x)
    rows = lead[0]
    for d in lead[1:]:
        rows = rows * d
    flat = x if len(lead) == 1 else ctx.emit(relax.op.reshape(x, [rows, k]))
    args = (flat, w) if bias is None else (flat, w, bias)
    y = ctx.emit_te(lambda a, b, *c: nt_matmul_te(a, b, c[0] if c else None, out_dtype), *args, name="linear")
    return y if len(lead) == 1 else ctx.emit(relax.op.reshape(y, [*lead, ctx.shape_of(w)[0]]))


@TABLE.register("linear")
def _(ctx, node):
    return Lowered("tir", "te.nt_matmul (weight in its [N, K] layout)",
                   outputs=[linear(ctx, *ctx.inputs(node), out_dtype=node.outputs[0].dtype)])


@TABLE.register("matmul")
def _(ctx, node):
    y = ctx.emit(relax.op.matmul(*ctx.inputs(node), out_dtype="float32"))
    return Lowered("relax", "relax.matmul", outputs=[ctx.astype(y, node.outputs[0].dtype)])


@TABLE.register("einsum")
def _(ctx, node):
    y = ctx.emit(relax.op.einsum([ctx.f32(v) for v in ctx.inputs(node)], node.attrs["equation"].replace(" ", "")))
    return Lowered("relax", "relax.einsum", outputs=[ctx.astype(y, node.outputs[0].dtype)])


@TABLE.register("conv2d")
def _(ctx, node):
    """relax.nn.conv2d in fp32 (NCHW / OIHW), + bias per output channel, cast to the declared dtype."""
    x, w, *bias = ctx.inputs(node)
    s, p = node.attrs["stride"], node.attrs["padding"]
    y = ctx.emit(relax.op.nn.conv2d(ctx.f32(x), ctx.f32(w), strides=(s, s), padding=(p, p, p, p),
                                    out_dtype="float32"))
    if bias:
        y = ctx.emit(relax.op.add(y, ctx.emit(relax.op.reshape(ctx.f32(bias[0]), [1, -1, 1, 1]))))
    return Lowered("relax", "relax.nn.conv2d", outputs=[ctx.astype(y, node.outputs[0].dtype)])
