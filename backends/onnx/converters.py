"""ONNX converters for dsgraph's primitive ops: one function per op, in a registry.

A converter gets the export context, the dsgraph node and the ONNX names of its
inputs, emits standard ONNX nodes and returns its output names (one per node output).
Domain ops register theirs in domain.py; an op without a converter is lowered with its
`.decomposition` by the exporter, and an op with neither is an explicit error.
"""
from __future__ import annotations

from typing import Callable

from .context import INT64_MAX, ONNX_DTYPES, OnnxContext

CONVERTERS: dict[str, Callable] = {}


def converts(*ops: str):
    def register(fn):
        for op in ops:
            CONVERTERS[op] = fn
        return fn
    return register


def dtype_of(value) -> str:
    return value.type.dtype


# ---------------------------------------------------------------- elementwise
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "maximum": "Max", "minimum": "Min",
           "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual"}
_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "sigmoid": "Sigmoid", "tanh": "Tanh",
          "cos": "Cos", "sin": "Sin", "abs": "Abs"}


@converts(*_BINARY)
def _binary(ctx: OnnxContext, node, ins):
    return ctx.emit(_BINARY[node.op], ins, node.op)


@converts(*_UNARY)
def _unary(ctx, node, ins):
    return ctx.emit(_UNARY[node.op], ins, node.op)


@converts("rsqrt")
def _rsqrt(ctx, node, ins):
    return ctx.emit("Reciprocal", [ctx.emit("Sqrt", ins, "sqrt")], "rsqrt")


@converts("silu")
def _silu(ctx, node, ins):
    return silu(ctx, ins[0])


def silu(ctx, x: str) -> str:
    return ctx.emit("Mul", [x, ctx.emit("Sigmoid", [x], "sigmoid")], "silu")


@converts("gelu")
def _gelu(ctx, node, ins):
    return ctx.emit("Gelu", ins, "gelu", approximate=node.attrs["approximate"])


@converts("pow")
def _pow(ctx, node, ins):
    return ctx.emit("Pow", [ins[0], ctx.const(node.attrs["exponent"], dtype_of(node.inputs[0]))], "pow")


@converts("where")
def _where(ctx, node, ins):
    return ctx.emit("Where", ins, "where")


@converts("cast")
def _cast(ctx, node, ins):
    return ctx.emit("Cast", ins, "cast", to=ONNX_DTYPES[node.outputs[0].type.dtype])


@converts("constant")
def _constant(ctx, node, ins):
    a = node.attrs
    import torch

    from dsgraph.dtypes import to_torch
    if isinstance(a["value"], tuple):
        t = torch.tensor(a["value"], dtype=to_torch(a["dtype"])).reshape(a["shape"])
    else:
        t = torch.full(a["shape"], a["value"], dtype=to_torch(a["dtype"]))
    return ctx.const(t, hint="constant")


# ---------------------------------------------------------------- linear algebra
def linear(ctx, x: str, w: str, bias: str | None = None) -> str:
    """x @ w.T (+ bias); the transpose of an initializer is folded by ONNX Runtime at load time."""
    y = ctx.emit("MatMul", [x, ctx.emit("Transpose", [w], "wT", perm=[1, 0])], "linear")
    return ctx.emit("Add", [y, bias], "linear_bias") if bias else y


@converts("linear")
def _linear(ctx, node, ins):
    return linear(ctx, ins[0], ins[1], ins[2] if len(ins) > 2 else None)


@converts("matmul")
def _matmul(ctx, node, ins):
    return ctx.emit("MatMul", ins, "matmul")


@converts("einsum")
def _einsum(ctx, node, ins):
    return ctx.emit("Einsum", ins, "einsum", equation=node.attrs["equation"].replace(" ", ""))


# ---------------------------------------------------------------- reductions
@converts("softmax")
def _softmax(ctx, node, ins):
    return ctx.emit("Softmax", ins, "softmax", axis=node.attrs["dim"])


_REDUCE = {"sum": "ReduceSum", "mean": "ReduceMean", "amax": "ReduceMax"}


@converts(*_REDUCE)
def _reduce(ctx, node, ins):
    a = node.attrs
    return ctx.emit(_REDUCE[node.op], [ins[0], ctx.ints(a["dims"])], node.op, keepdims=int(a["keepdim"]))


@converts("argmax")
def _argmax(ctx, node, ins):
    return ctx.emit("ArgMax", ins, "argmax", axis=node.attrs["dim"], keepdims=int(node.attrs["keepdim"]))


@converts("topk")
def _topk(ctx, node, ins):
    a = node.attrs
    return ctx.emit("TopK", [ins[0], ctx.ints([a["k"]])], "topk", outputs=2, axis=a["dim"],
                    largest=int(a["largest"]), sorted=1)


# ---------------------------------------------------------------- shapes
@converts("reshape")
def _reshape(ctx, node, ins):
    return ctx.emit("Reshape", [ins[0], ctx.shape(node.attrs["shape"])], "reshape")


@converts("permute")
def _permute(ctx, node, ins):
    rank = node.inputs[0].type.rank
    return ctx.emit("Transpose", ins, "permute", perm=[d % rank for d in node.attrs["dims"]])


@converts("expand")
def _expand(ctx, node, ins):
    return ctx.emit("Expand", [ins[0], ctx.shape(node.attrs["shape"])], "expand")


@converts("split")
def _split(ctx, node, ins):
    a = node.attrs
    return ctx.emit("Split", [ins[0], ctx.shape(a["sizes"])], "split", outputs=len(a["sizes"]), axis=a["dim"])


@converts("slice")
def _slice(ctx, node, ins):
    a = node.attrs
    end = INT64_MAX if a["end"] is None else a["end"]
    return ctx.emit("Slice", [ins[0], ctx.ints([a["start"]]), ctx.ints([end]), ctx.ints([a["dim"]])], "slice")


@converts("concat")
def _concat(ctx, node, ins):
    return ctx.emit("Concat", ins, "concat", axis=node.attrs["dim"])


# ---------------------------------------------------------------- indexing
@converts("embed")
def _embed(ctx, node, ins):
    return ctx.emit("Gather", [ins[1], ins[0]], "embed", axis=0)


@converts("gather")
def _gather(ctx, node, ins):
    return ctx.emit("GatherElements", ins, "gather", axis=node.attrs["dim"])


@converts("scatter")
def _scatter(ctx, node, ins):
    return ctx.emit("ScatterElements", ins, "scatter", axis=node.attrs["dim"])


@converts("index_add")
def _index_add(ctx, node, ins):
    """x[index[i]] += src[i] along dim: ScatterND(reduction=add) with dim moved to the front."""
    rank = node.inputs[0].type.rank
    d = node.attrs["dim"] % rank
    perm = [d] + [i for i in range(rank) if i != d]
    inv = [perm.index(i) for i in range(rank)]
    x, src = ins[0], ins[2]
    if d:
        x = ctx.emit("Transpose", [x], "ia_x", perm=perm)
        src = ctx.emit("Transpose", [src], "ia_src", perm=perm)
    idx = ctx.emit("Unsqueeze", [ins[1], ctx.ints([-1])], "ia_idx")
    out = ctx.emit("ScatterND", [x, idx, src], "index_add", reduction="add")
    return ctx.emit("Transpose", [out], "index_add_t", perm=inv) if d else out


@converts("index_select")
def _index_select(ctx, node, ins):
    return ctx.emit("Gather", ins, "index_select", axis=node.attrs["dim"])


def arange(ctx, size_1d: str, hint: str = "arange") -> str:
    """int64 [0, 1, ..., n-1] for an int64 [1] size tensor."""
    n = ctx.emit("Squeeze", [size_1d, ctx.ints([0])], f"{hint}_n")
    return ctx.emit("Range", [ctx.const(0, "int64"), n, ctx.const(1, "int64")], hint)


def dim_of(ctx, x: str, axis: int, hint: str = "size") -> str:
    """int64 [1]: the runtime size of axis `axis` (non-negative) of x."""
    return ctx.emit("Shape", [x], hint, start=axis, end=axis + 1)


@converts("arange_like")
def _arange_like(ctx, node, ins):
    return arange(ctx, dim_of(ctx, ins[0], node.attrs["dim"] % node.inputs[0].type.rank))


def causal_mask(ctx, q: str, q_axis: int, k: str, k_axis: int) -> str:
    """bool [Sq, Sk]: key j visible to query i iff j <= Sk - Sq + i."""
    sq, sk = dim_of(ctx, q, q_axis, "sq"), dim_of(ctx, k, k_axis, "sk")
    qi = ctx.emit("Add", [arange(ctx, sq, "qpos"), ctx.emit("Sub", [sk, sq], "offset")], "qabs")
    qi = ctx.emit("Unsqueeze", [qi, ctx.ints([1])], "qcol")
    return ctx.emit("LessOrEqual", [arange(ctx, sk, "kpos"), qi], "causal")


@converts("causal_mask")
def _causal_mask(ctx, node, ins):
    a = node.attrs
    return causal_mask(ctx, ins[0], a["q_dim"] % node.inputs[0].type.rank, ins[1],
                       a["k_dim"] % node.inputs[1].type.rank)


# ---------------------------------------------------------------- sorting and counting
@converts("argsort")
def _argsort(ctx, node, ins):
    """Stable argsort = TopK over the whole axis (ONNX TopK puts the lower index first on ties)."""
    a = node.attrs
    axis = a["dim"] % node.inputs[0].type.rank
    return ctx.emit("TopK", [ins[0], dim_of(ctx, ins[0], axis, "sort_len")], "argsort", outputs=2, axis=axis,
                    largest=int(a["descending"]), sorted=1)[1]


@converts("cumsum")
def _cumsum(ctx, node, ins):
    return ctx.emit("CumSum", [ins[0], ctx.const(node.attrs["dim"], "int64")], "cumsum")


@converts("bincount")
def _bincount(ctx, node, ins):
    """One-hot count: values outside 0..length-1 are not counted (the reference raises InputError)."""
    bins = arange(ctx, ctx.ints([node.attrs["length"]]), "bins")
    hits = ctx.emit("Equal", [ctx.emit("Unsqueeze", [ins[0], ctx.ints([-1])], "bc_col"), bins], "bc_hits")
    return ctx.emit("ReduceSum", [ctx.emit("Cast", [hits], "bc_int", to=ONNX_DTYPES["int64"]), ctx.ints([0])],
                    "bincount", keepdims=0)
