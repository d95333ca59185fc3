"""Elementwise primitives -> Relax built-ins (numpy broadcasting is Relax's too)."""
from __future__ import annotations

import numpy as np
from tvm import relax

from .fp8 import FP8, decode_te
from .registry import Lowered, lower

_BINARY = {"add": relax.op.add, "sub": relax.op.subtract, "mul": relax.op.multiply, "div": relax.op.divide,
           "maximum": relax.op.maximum, "minimum": relax.op.minimum, "eq": relax.op.equal, "lt": relax.op.less,
           "le": relax.op.less_equal, "gt": relax.op.greater, "ge": relax.op.greater_equal}
_UNARY = {"neg": relax.op.negative, "exp": relax.op.exp, "log": relax.op.log, "sqrt": relax.op.sqrt,
          "rsqrt": relax.op.rsqrt, "sigmoid": relax.op.sigmoid, "silu": relax.op.nn.silu, "tanh": relax.op.tanh,
          "cos": relax.op.cos, "sin": relax.op.sin, "abs": relax.op.abs}


def _binary(op, fn):
    @lower(op)
    def _(ctx, node, a, b):
        return Lowered([ctx.emit(fn(a, b))], "relax", f"relax.{fn.__name__}")


def _unary(op, fn):
    @lower(op)
    def _(ctx, node, x):
        return Lowered([ctx.emit(fn(x))], "relax", f"relax.{fn.__name__}")


for _op, _fn in _BINARY.items():
    _binary(_op, _fn)
for _op, _fn in _UNARY.items():
    _unary(_op, _fn)


@lower("gelu")
def _(ctx, node, x):
    fn = relax.op.nn.gelu_tanh if node.attrs["approximate"] == "tanh" else relax.op.nn.gelu
    return Lowered([ctx.emit(fn(x))], "relax", f"relax.nn.{fn.__name__}")


@lower("pow")
def _(ctx, node, x):
    e = ctx.const(node.attrs["exponent"], ctx.dtype_of(x))
    return Lowered([ctx.emit(relax.op.power(x, e))], "relax", "relax.power")


@lower("where")
def _(ctx, node, cond, a, b):
    return Lowered([ctx.emit(relax.op.where(cond, a, b))], "relax", "relax.where")


@lower("cast")
def _(ctx, node, x):
    """From FP8, TVM's own cast is wrong on subnormals and NaN: decode the bits in TE (lower/fp8.py)."""
    if ctx.dtype_of(x) == FP8:
        return Lowered([ctx.emit_te(decode_te, x, node.outputs[0].dtype, name="fp8_decode")], "tir",
                       "te.fp8_decode (exact e4m3)")
    if node.outputs[0].dtype == FP8:
        raise ValueError("casting to float8_e4m3fn is not supported by the tvm backend (TVM's fp8 rounding is "
                         "unverified); quantise weights offline")
    return Lowered([ctx.emit(relax.op.astype(x, node.outputs[0].dtype))], "relax", "relax.astype")


@lower("constant")
def _(ctx, node):
    """Literals (small: rope tables, masks' fill values) are folded into the module; weights never are."""
    value, shape = node.attrs["value"], node.attrs["shape"]
    arr = np.asarray(value).reshape(shape) if isinstance(value, tuple) else np.full(shape, value)
    return Lowered([ctx.const(arr, node.outputs[0].dtype)], "relax", "relax.const", "literal folded into the module")
