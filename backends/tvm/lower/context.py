"""What a lowering sees while the graph is translated: the BlockBuilder, the target, the symbolic dims
as TIR variables, and helpers that keep every lowering short (dims, casts, constants, TE calls).

Symbolic dims stay symbolic: each dsgraph symbol ("B", "S", "T") is one `tirx.Var` shared by the whole
function, and a polynomial dim such as T+S or B*S becomes the same expression over those variables, so
one build serves every batch size and sequence length.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dsgraph.errors import ShapeError
from dsgraph.ir import Node
from dsgraph.symbolic import Sym, floor_atom, parse_dim

from ..deps import relax, tirx, tvm


@dataclass
class DerivedParam:
    """A function parameter computed from graph weights when they are bound (e.g. per-expert
    matrices stacked into [E, N, K]); `recipe` names a pure-torch function in backends/tvm/runtime.py,
    so a runtime-only process can rebuild it from the saved weights."""

    name: str
    recipe: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str


class LowerCtx:
    def __init__(self, bb: relax.BlockBuilder, target: tvm.target.Target):
        self.bb = bb
        self.target = target
        self.syms: dict[str, tirx.Var] = {}
        self.values: dict[int, relax.Expr] = {}  # id(dsgraph Value) -> its Relax expression, set by the translator
        self.derived: list[DerivedParam] = []
        self.derived_vars: dict[str, relax.Var] = {}

    def inputs(self, node: Node) -> list[relax.Expr]:
        """The Relax expressions of the node's inputs, in order."""
        return [self.values[id(v)] for v in node.inputs]

    @property
    def is_gpu(self) -> bool:
        return "gpu" in self.target.keys

    # dims and types ----------------------------------------------------------
    def sym(self, name: str) -> tirx.Var:
        if name not in self.syms:
            self.syms[name] = tirx.Var(name, "int64")
        return self.syms[name]

    def dim(self, d):
        """A dsgraph dim (int, Sym or its text "B*S") -> int or int64 PrimExpr."""
        d = parse_dim(d)
        if not isinstance(d, Sym):
            return int(d)
        total = None
        for mono, coef in d.terms.items():
            term = tirx.IntImm("int64", coef)
            for s in mono:
                term = term * (tirx.floordiv(self.dim(floor_atom(s)[0]), floor_atom(s)[1]) if "//" in s
                               else self.sym(s))
            total = term if total is None else total + term
        return total

    def dims(self, shape) -> list:
        return [self.dim(d) for d in shape]

    @staticmethod
    def shape_of(x: relax.Expr) -> list:
        shape = x.ty.shape
        if shape is None:
            raise ShapeError(f"tvm lowering: the shape of {x} is unknown")
        return list(shape.values)

    @staticmethod
    def dtype_of(x: relax.Expr) -> str:
        return str(x.ty.dtype)

    # emitting ------------------------------------------------------------------
    def emit(self, expr: relax.Expr, name: str = "") -> relax.Var:
        return self.bb.emit(expr, name)

    def emit_te(self, fn, *args, name: str, **kwargs) -> relax.Var:
        """A TE function of ours as its own PrimFunc (name hint `name`)."""
        return self.bb.emit_te(fn, *args, primfunc_name_hint=name, **kwargs)

    def astype(self, x: relax.Expr, dtype: str) -> relax.Expr:
        return x if self.dtype_of(x) == dtype else self.emit(relax.op.astype(x, dtype))

    def f32(self, x: relax.Expr) -> relax.Expr:
        """References compute in fp32 (fp64 stays fp64)."""
        return x if self.dtype_of(x) in ("float32", "float64") else self.astype(x, "float32")

    @staticmethod
    def const(value, dtype: str = "float32") -> relax.Constant:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        return relax.const(np.asarray(value, dtype=dtype), dtype)

    def derived_param(self, name: str, recipe: str, sources: tuple[str, ...], shape, dtype: str) -> relax.Var:
        """A parameter the CompiledGraph computes from weights at bind time (reported as a note)."""
        if name not in self.derived_vars:
            self.derived.append(DerivedParam(name, recipe, tuple(sources), tuple(int(s) for s in shape), dtype))
            self.derived_vars[name] = relax.Var(name, relax.TensorType(list(shape), dtype))
        return self.derived_vars[name]
