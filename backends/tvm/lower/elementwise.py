"""Elementwise primitives -> Relax built-ins (numpy broadcasting is Relax's too)."""
from __future__ import annotations

from operator import attrgetter

import numpy as np
from dsgraph.backends.lowering import Decline

from ..deps import relax
from .fp8 import FP8, decode_te
from .registry import TABLE, Lowered

# dsgraph op -> the Relax op's name under relax.op (resolved when lowering: naming them imports no TVM)
_BINARY = {"add": "add", "sub": "subtract", "mul": "multiply", "div": "divide", "maximum": "maximum",
           "minimum": "minimum", "eq": "equal", "lt": "less", "le": "less_equal", "gt": "greater",
           "ge": "greater_equal"}
_UNARY = {"neg": "negative", "exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "sigmoid": "sigmoid",
          "silu": "nn.silu", "tanh": "tanh", "cos": "cos", "sin": "sin", "abs": "abs"}


def _relax_op(name: str):
    return attrgetter(name)(relax.op)


@TABLE.register(*_BINARY, *_UNARY)
def _(ctx, node):
    fn = _relax_op(_BINARY.get(node.op) or _UNARY[node.op])
    return Lowered("relax", f"relax.{fn.__name__}", outputs=[ctx.emit(fn(*ctx.inputs(node)))])


@TABLE.register("gelu")
def _(ctx, node):
    fn = relax.op.nn.gelu_tanh if node.attrs["approximate"] == "tanh" else relax.op.nn.gelu
    return Lowered("relax", f"relax.nn.{fn.__name__}", outputs=[ctx.emit(fn(*ctx.inputs(node)))])


@TABLE.register("pow")
def _(ctx, node):
    x, = ctx.inputs(node)
    e = ctx.const(node.attrs["exponent"], ctx.dtype_of(x))
    return Lowered("relax", "relax.power", outputs=[ctx.emit(relax.op.power(x, e))])


@TABLE.register("where")
def _(ctx, node):
    return Lowered("relax", "relax.where", outputs=[ctx.emit(relax.op.where(*ctx.inputs(node)))])


@TABLE.register("cast")
def _(ctx, node):
    """From FP8, TVM's own cast is wrong on subnormals and NaN: decode the bits in TE (lower/fp8.py)."""
    x, = ctx.inputs(node)
    if ctx.dtype_of(x) == FP8:
        return Lowered("tir", "te.fp8_decode (exact e4m3)",
                       outputs=[ctx.emit_te(decode_te, x, node.outputs[0].dtype, name="fp8_decode")])
    if node.outputs[0].dtype == FP8:
        return Decline("casting to float8_e4m3fn is not supported by the tvm backend (TVM's fp8 rounding is "
                       "unverified); quantise weights offline")
    return Lowered("relax", "relax.astype", outputs=[ctx.emit(relax.op.astype(x, node.outputs[0].dtype))])


@TABLE.register("constant")
def _(ctx, node):
    """Literals (small: rope tables, masks' fill values) are folded into the module; weights never are."""
    value, shape = node.attrs["value"], node.attrs["shape"]
    arr = np.asarray(value).reshape(shape) if isinstance(value, tuple) else np.full(shape, value)
    return Lowered("relax", "relax.const", "literal folded into the module",
                   outputs=[ctx.const(arr, node.outputs[0].dtype)])
