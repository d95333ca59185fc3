"""ONNX converters for dsgraph's primitive ops: one lowering per op in the onnx table (registry.py).

A converter `(ctx, node)` reads the ONNX names of the node's inputs from the export context,
emits standard ONNX nodes and returns their output names (one per node output) as `converted(...)`.
Domain ops register theirs in domain.py; an op without a converter is lowered with its
`.decomposition` by the exporter, and an op with neither is an explicit error.
"""
from __future__ import annotations

import torch

from dsgraph.dtypes import to_torch

from .context import INT64_MAX, onnx_dtype
from .registry import TABLE, converted


def dtype_of(value) -> str:
    return value.type.dtype


# ---------------------------------------------------------------- elementwise
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "maximum": "Max", "minimum": "Min",
           "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual"}
_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "sigmoid": "Sigmoid", "tanh": "Tanh",
          "cos": "Cos", "sin": "Sin", "abs": "Abs"}


# ops that are one ONNX operator over the same inputs, as they are or along attribute `dim`
_DIRECT = {**_BINARY, **_UNARY, "where": "Where", "matmul": "MatMul"}
_ALONG_DIM = {"softmax": "Softmax", "concat": "Concat", "gather": "GatherElements", "scatter": "ScatterElements",
              "index_select": "Gather"}


@TABLE.register(*_DIRECT)
def _direct(ctx, node):
    return converted(ctx.emit(_DIRECT[node.op], ctx.inputs(node), node.op))


@TABLE.register(*_ALONG_DIM)
def _along_dim(ctx, node):
    return converted(ctx.emit(_ALONG_DIM[node.op], ctx.inputs(node), node.op, axis=node.attrs["dim"]))


@TABLE.register("rsqrt")
def _rsqrt(ctx, node):
    ins = ctx.inputs(node)
    return converted(ctx.emit("Reciprocal", [ctx.emit("Sqrt", ins, "sqrt")], "rsqrt"))


@TABLE.register("silu")
def _silu(ctx, node):
    ins = ctx.inputs(node)
    return converted(silu(ctx, ins[0]))


def silu(ctx, x: str) -> str:
    return ctx.emit("Mul", [x, ctx.emit("Sigmoid", [x], "sigmoid")], "silu")


@TABLE.register("gelu")
def _gelu(ctx, node):
    ins = ctx.inputs(node)
    return converted(ctx.emit("Gelu", ins, "gelu", approximate=node.attrs["approximate"]))


@TABLE.register("pow")
def _pow(ctx, node):
    ins = ctx.inputs(node)
    return converted(ctx.emit("Pow", [ins[0], ctx.const(node.attrs["exponent"], dtype_of(node.inputs[0]))], "pow"))


@TABLE.register("cast")
def _cast(ctx, node):
    ins = ctx.inputs(node)
    return converted(ctx.emit("Cast", ins, "cast", to=onnx_dtype(node.outputs[0].type.dtype)))


@TABLE.register("constant")
def _constant(ctx, node):
    a = node.attrs
    if isinstance(a["value"], tuple):
        t = torch.tensor(a["value"], dtype=to_torch(a["dtype"])).reshape(a["shape"])
    else:
        t = torch.full(a["shape"], a["value"], dtype=to_torch(a["dtype"]))
    return converted(ctx.const(t, hint="constant"))


# ---------------------------------------------------------------- linear algebra
def linear(ctx, x: str, w: str, bias: str | None = None) -> str:
    """x @ w.T (+ bias); the transpose of an initializer is folded by ONNX Runtime at load time."""
    y = ctx.emit("MatMul", [x, ctx.emit("Transpose", [w], "wT", perm=[1, 0])], "linear")
    return ctx.emit("Add", [y, bias], "linear_bias") if bias else y


@TABLE.register("linear")
def _linear(ctx, node):
    ins = ctx.inputs(node)
    return converted(linear(ctx, ins[0], ins[1], ins[2] if len(ins) > 2 else None))


@TABLE.register("einsum")
def _einsum(ctx, node):
    ins = ctx.inputs(node)
    return converted(ctx.emit("Einsum", ins, "einsum", equation=node.attrs["equation"].replace(" ", "")))


# ---------------------------------------------------------------- reductions
_REDUCE = {"sum": "ReduceSum", "mean": "ReduceMean", "amax": "ReduceMax"}


@TABLE.register(*_REDUCE)
def _reduce(ctx, node):
    ins = ctx.inputs(node)
    a = node.attrs
    return converted(ctx.emit(_REDUCE[node.op], [ins[0], ctx.ints(a["dims"])], node.op, keepdims=int(a["keepdim"])))


@TABLE.register("argmax")
def _argmax(ctx, node):
    ins = ctx.inputs(node)
    return converted(ctx.emit("ArgMax", ins, "argmax", axis=node.attrs["dim"], keepdims=int(node.attrs["keepdim"])))


@TABLE.register("topk")
def _topk(ctx, node):
    ins = ctx.inputs(node)
    a = node.attrs
    return converted(ctx.emit("TopK", [ins[0], ctx.ints([a["k"]])], "topk", outputs=2, axis=a["dim"],
                              largest=int(a["largest"]), sorted=1))


# ---------------------------------------------------------------- shapes
@TABLE.register("reshape", "expand")
def _to_shape(ctx, node):
    x, = ctx.inputs(node)
    if node.op == "expand":
        return converted(ctx.emit("Expand", [x, ctx.shape(node.attrs["shape"])], node.op))
    # allowzero: a dim that is 0 at runtime (V4's groups a step completes) means 0, not "copy the input's"
    return converted(ctx.emit("Reshape", [x, ctx.shape(node.attrs["shape"])], node.op, allowzero=1))


@TABLE.register("permute")
def _permute(ctx, node):
    ins = ctx.inputs(node)
    rank = node.inputs[0].type.rank
    return converted(ctx.emit("Transpose", ins, "permute", perm=[d % rank for d in node.attrs["dims"]]))


@TABLE.register("split")
def _split(ctx, node):
    ins = ctx.inputs(node)
    a = node.attrs
    return converted(ctx.emit("Split", [ins[0], ctx.shape(a["sizes"])], "split", outputs=len(a["sizes"]),
                              axis=a["dim"]))


@TABLE.register("slice")
def _slice(ctx, node):
    ins = ctx.inputs(node)
    a = node.attrs
    end = INT64_MAX if a["end"] is None else a["end"]
    return converted(ctx.emit("Slice", [ins[0], ctx.ints([a["start"]]), ctx.ints([end]), ctx.ints([a["dim"]])],
                              "slice"))


# ---------------------------------------------------------------- indexing
@TABLE.register("embed")
def _embed(ctx, node):
    ins = ctx.inputs(node)
    return converted(ctx.emit("Gather", [ins[1], ins[0]], "embed", axis=0))


@TABLE.register("index_add")
def _index_add(ctx, node):
    """x[index[i]] += src[i] along dim: ScatterND(reduction=add) with dim moved to the front."""
    ins = ctx.inputs(node)
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
    return converted(ctx.emit("Transpose", [out], "index_add_t", perm=inv) if d else out)


def arange(ctx, size_1d: str, hint: str = "arange") -> str:
    """int64 [0, 1, ..., n-1] for an int64 [1] size tensor."""
    n = ctx.emit("Squeeze", [size_1d, ctx.ints([0])], f"{hint}_n")
    return ctx.emit("Range", [ctx.const(0, "int64"), n, ctx.const(1, "int64")], hint)


def dim_of(ctx, x: str, axis: int, hint: str = "size") -> str:
    """int64 [1]: the runtime size of axis `axis` (non-negative) of x."""
    return ctx.emit("Shape", [x], hint, start=axis, end=axis + 1)


@TABLE.register("arange_like")
def _arange_like(ctx, node):
    ins = ctx.inputs(node)
    return converted(arange(ctx, dim_of(ctx, ins[0], node.attrs["dim"] % node.inputs[0].type.rank)))


def causal_mask(ctx, q: str, q_axis: int, k: str, k_axis: int) -> str:
    """bool [Sq, Sk]: key j visible to query i iff j <= Sk - Sq + i."""
    sq, sk = dim_of(ctx, q, q_axis, "sq"), dim_of(ctx, k, k_axis, "sk")
    qi = ctx.emit("Add", [arange(ctx, sq, "qpos"), ctx.emit("Sub", [sk, sq], "offset")], "qabs")
    qi = ctx.emit("Unsqueeze", [qi, ctx.ints([1])], "qcol")
    return ctx.emit("LessOrEqual", [arange(ctx, sk, "kpos"), qi], "causal")


@TABLE.register("causal_mask")
def _causal_mask(ctx, node):
    ins = ctx.inputs(node)
    a = node.attrs
    return converted(causal_mask(ctx, ins[0], a["q_dim"] % node.inputs[0].type.rank, ins[1],
                                 a["k_dim"] % node.inputs[1].type.rank))


# ---------------------------------------------------------------- sorting and counting
@TABLE.register("argsort")
def _argsort(ctx, node):
    """Stable argsort = TopK over the whole axis (ONNX TopK puts the lower index first on ties)."""
    ins = ctx.inputs(node)
    a = node.attrs
    axis = a["dim"] % node.inputs[0].type.rank
    _, order = ctx.emit("TopK", [ins[0], dim_of(ctx, ins[0], axis, "sort_len")], "argsort", outputs=2, axis=axis,
                        largest=int(a["descending"]), sorted=1)
    return converted(order)


@TABLE.register("cumsum")
def _cumsum(ctx, node):
    ins = ctx.inputs(node)
    return converted(ctx.emit("CumSum", [ins[0], ctx.const(node.attrs["dim"], "int64")], "cumsum"))


@TABLE.register("bincount")
def _bincount(ctx, node):
    """One-hot count: values outside 0..length-1 are not counted (the reference raises InputError)."""
    ins = ctx.inputs(node)
    bins = arange(ctx, ctx.ints([node.attrs["length"]]), "bins")
    hits = ctx.emit("Equal", [ctx.emit("Unsqueeze", [ins[0], ctx.ints([-1])], "bc_col"), bins], "bc_hits")
    counts = ctx.emit("Cast", [hits], "bc_int", to=onnx_dtype("int64"))
    return converted(ctx.emit("ReduceSum", [counts, ctx.ints([0])], "bincount", keepdims=0))
