"""The lowering registry: op name -> functions that map a node (or a fused region starting at it) to a kernel.

    @lowering("norm.rms")
    def _(node, ctx):
        src = ctx.generated(codegen.rowwise.rms_norm(...), node)
        return Lowered(lambda args, sym: [src(*args)], "generated", src.name)

A lowering returns a `Lowered` (a runnable step plus its report entry) or None when it does not apply (say, a
dtype the kernel lacks); the backend then tries the next lowering registered for the op and, last, the torch
reference — as a `fallback` entry in the compile report, never silently. A lowering may claim more nodes than the
one it was called on (a fused region); `LowerCtx.region_ok` checks that doing so keeps the program valid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from dsgraph.ir import Node, Value

StepFn = Callable[[list, dict], list]  # (argument tensors, symbol env) -> output tensors

_LOWERINGS: dict[str, list[Callable]] = {}


def lowering(*ops: str):
    """Register a lowering for one or more ops (tried in registration order)."""
    def deco(fn):
        for op in ops:
            _LOWERINGS.setdefault(op, []).append(fn)
        return fn
    return deco


def lowerings_for(op: str) -> list[Callable]:
    return _LOWERINGS.get(op, [])


def registered_ops() -> list[str]:
    return sorted(_LOWERINGS)


@dataclass
class Lowered:
    """A step of the lowered program and how the report describes it.

    `fn(args, sym)` gets the tensors of `inputs` (default: the node's inputs) and the bound symbols, and returns
    the tensors of `outputs` (default: the node's outputs). `nodes` lists every node the step implements (default:
    the node alone). `const_inputs` are inputs bound once at compile time (weights, folded values).
    """

    fn: StepFn
    kind: str
    kernel: str
    note: str = ""
    nodes: tuple[Node, ...] = ()
    inputs: tuple[Value, ...] | None = None
    outputs: tuple[Value, ...] | None = None


class Decline:
    """Returned by a lowering that does not apply, with the reason the report shows if nothing else does."""

    def __init__(self, reason: str):
        self.reason = reason


@dataclass
class Region:
    """A candidate fused region: nodes (in graph order) and the values it must hand to the rest of the graph."""

    nodes: list[Node] = field(default_factory=list)

    def values(self) -> set[int]:
        return {id(v) for n in self.nodes for v in n.outputs}

    def external_inputs(self) -> list[Value]:
        inside, seen, out = self.values(), set(), []
        for n in self.nodes:
            for v in n.inputs:
                if id(v) not in inside and id(v) not in seen:
                    seen.add(id(v))
                    out.append(v)
        return out
