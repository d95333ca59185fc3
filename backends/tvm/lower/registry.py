"""The lowering registry: dsgraph op -> a function that emits Relax for one node.

    @lower("norm.rms")
    def _(ctx, node, x, weight):
        return Lowered([ctx.emit(relax.op.nn.rms_norm(x, weight, [-1], node.attrs["eps"]))],
                       "relax", "relax.nn.rms_norm")

A lowering gets the node and the Relax expressions of its inputs and returns a `Lowered`: one Relax
expression per node output plus how the compile report describes it — kind "relax" when it emits Relax
built-in ops (legalised by TVM's own TOPI rules), "tir" when it emits a TE/TIR function written here for
an op Relax has nothing fitting for. One module per op family registers its lowerings on import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

_LOWERINGS: dict[str, Callable] = {}


@dataclass
class Lowered:
    """Relax expressions for the node's outputs and the report entry (kind: "relax" | "tir")."""

    outputs: list
    kind: str
    kernel: str
    note: str = ""


def lower(*ops: str):
    """Register the lowering of one or more ops (one lowering per op: a second is a bug)."""
    def deco(fn):
        for op in ops:
            if op in _LOWERINGS:
                raise ValueError(f"tvm lowering for {op!r} registered twice")
            _LOWERINGS[op] = fn
        return fn
    return deco


def lowering_for(op: str) -> Callable | None:
    return _LOWERINGS.get(op)


def lowered_ops() -> frozenset[str]:
    return frozenset(_LOWERINGS)
