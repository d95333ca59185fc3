"""The state one ONNX export builds up: node list, initializers, symbolic dims.

Converters (converters.py, domain.py) receive an `OnnxContext`, read their inputs' ONNX
names with `ctx.inputs(node)`, emit ONNX nodes through `ctx.emit`, constants through
`ctx.const`, and runtime sizes through
`ctx.dim` / `ctx.shape`: a symbolic dsgraph dim ("B", "T+S", "B*S") becomes an
int64 [1] tensor computed from the `Shape` of the graph input that binds each
symbol, so one exported model serves every batch size and sequence length.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from dsgraph.dtypes import dtype_name, to_torch
from dsgraph.errors import ShapeError
from dsgraph.ir import Node
from dsgraph.symbolic import Sym, floor_atom, parse_dim

from .deps import onnx

# dsgraph dtype -> the name of its onnx.TensorProto data type (looked up when exporting: naming them imports no onnx)
_TENSOR_TYPES = {"float32": "FLOAT", "float16": "FLOAT16", "bfloat16": "BFLOAT16", "float64": "DOUBLE",
                 "float8_e4m3fn": "FLOAT8E4M3FN", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}
_RAW_VIEW = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}
INT64_MAX = 2**63 - 1


def onnx_dtype(dtype: str) -> int:
    """The ONNX tensor data type of a dsgraph dtype name."""
    return getattr(onnx.TensorProto, _TENSOR_TYPES[dtype])


def tensor_proto(t: torch.Tensor, name: str) -> onnx.TensorProto:
    """A torch tensor as an ONNX TensorProto (bf16 and fp8 go through their raw bytes)."""
    t = t.detach().cpu().contiguous()
    if t.dtype in _RAW_VIEW:
        proto = onnx.TensorProto(name=name, data_type=onnx_dtype(dtype_name(t.dtype)), dims=list(t.shape))
        proto.raw_data = t.view(_RAW_VIEW[t.dtype]).numpy().tobytes()
        return proto
    return onnx.numpy_helper.from_array(t.numpy(), name)


class OnnxContext:
    """Collects nodes and initializers; knows where each dim symbol can be read at runtime."""

    def __init__(self, graph):
        self.graph = graph
        self.prefix = ""                         # the dsgraph value being converted, for readable names
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.names: dict[int, str] = {}          # id(dsgraph Value) -> ONNX tensor name
        self._used: set[str] = set()
        self._counter = itertools.count()
        self._consts: dict[tuple, str] = {}
        self._dims: dict[str, str] = {}
        self._symbol_source: dict[str, tuple[str, int]] = {}
        for name, v in graph.inputs.items():
            if v.kind == "param":
                continue
            for axis, d in enumerate(v.type.shape):
                if isinstance(d, Sym) and len(d.terms) == 1 and list(d.terms.items())[0][1] == 1:
                    (sym,), = list(d.terms)
                    self._symbol_source.setdefault(sym, (name, axis))

    # names ---------------------------------------------------------------------
    def inputs(self, node: Node) -> list[str]:
        """The ONNX names of the node's inputs, in order."""
        return [self.names[id(v)] for v in node.inputs]

    def fresh(self, hint: str) -> str:
        name = hint
        while name in self._used:
            name = f"{hint}__{next(self._counter)}"
        self._used.add(name)
        return name

    def reserve(self, name: str) -> str:
        self._used.add(name)
        return name

    # nodes and constants -----------------------------------------------------------
    def emit(self, op_type: str, inputs, hint: str = "t", outputs: int = 1, domain: str = "", **attrs):
        """Append one ONNX node; returns its output name (or list of names if outputs > 1)."""
        hint = f"{self.prefix}/{hint}" if self.prefix else hint
        outs = [self.fresh(hint if outputs == 1 else f"{hint}.{i}") for i in range(outputs)]
        self.nodes.append(onnx.helper.make_node(op_type, [i or "" for i in inputs], outs,
                                           name=self.fresh(f"n.{hint}"), domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype: str = "float32", hint: str = "const") -> str:
        """An initializer holding `value` (scalar, list, numpy array or tensor); small ones are shared."""
        if isinstance(value, torch.Tensor):
            t = value
        else:
            t = torch.tensor(np.asarray(value).tolist(), dtype=to_torch(dtype))
        key = None
        if t.numel() <= 16:
            key = (str(t.dtype), tuple(t.shape), tuple(t.flatten().tolist()))
            if key in self._consts:
                return self._consts[key]
        name = self.fresh(f"{self.prefix}/{hint}" if self.prefix and key is None else hint)
        self.initializers.append(tensor_proto(t, name))
        if key is not None:
            self._consts[key] = name
        return name

    def ints(self, values) -> str:
        return self.const(list(values), "int64", "ints")

    # symbolic dims ----------------------------------------------------------------
    def dim(self, d) -> str:
        """An int64 [1] tensor holding dim `d` (int, Sym or text like "B*S") at runtime."""
        d = parse_dim(d)
        if isinstance(d, int):
            return self.ints([d])
        key = str(d)
        if key in self._dims:
            return self._dims[key]
        total = None
        for mono, coeff in d.terms.items():
            term = self.ints([coeff]) if coeff != 1 or not mono else None
            for sym in mono:
                s = self._symbol(sym)
                term = s if term is None else self.emit("Mul", [term, s], "dim")
            total = term if total is None else self.emit("Add", [total, term], "dim")
        self._dims[key] = total
        return total

    def _symbol(self, sym: str) -> str:
        if sym in self._dims:
            return self._dims[sym]
        if "//" in sym and sym not in self._symbol_source:   # a floor atom: integer Div (the sizes are >= 0)
            num, m = floor_atom(sym)
            self._dims[sym] = self.emit("Div", [self.dim(num), self.ints([m])], "dim")
            return self._dims[sym]
        if sym not in self._symbol_source:
            raise ShapeError(f"ONNX export of graph {self.graph.name}: dim symbol {sym!r} is not the size of any "
                             "graph input axis, so it cannot be read at runtime; bind it through an input")
        src, axis = self._symbol_source[sym]
        self._dims[sym] = self.emit("Shape", [src], f"dim.{sym}", start=axis, end=axis + 1)
        return self._dims[sym]

    def shape(self, dims) -> str:
        """An int64 [rank] shape tensor; constant when every dim is an int."""
        dims = [parse_dim(d) for d in dims]
        if all(isinstance(d, int) for d in dims):
            return self.ints(dims)
        return self.emit("Concat", [self.dim(d) for d in dims], "shape", axis=0)
