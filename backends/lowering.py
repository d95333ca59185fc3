"""The one lowering protocol every backend shares (TVM's `register_legalize`: one signature, one policy).

A lowering is a function `(ctx, node) -> Lowered | Decline`. `ctx` is the backend's lowering context (what it
has built so far, how to reach a node's inputs); `node` is the node to lower, or the root of a fused region the
lowering may claim (`Lowered.nodes`). Each backend keeps one `LoweringTable`:

    TABLE = LoweringTable("tvm", fallback="error")

    @TABLE.register("norm.rms")
    def _(ctx, node):
        x, w = ctx.inputs(node)
        return TvmLowered(kind="relax", kernel="relax.nn.rms_norm", outputs=[...])

Policies, the same for every backend:
  - duplicates: an op may have several candidate lowerings, tried in registration order (a template first, a
    generic kernel after); registering the same function twice for an op is an error.
  - declines: a candidate that does not apply returns `Decline(reason)`; the reasons of every candidate are kept.
  - fallback: when every candidate declines, the table's `fallback` decides — "reference" runs the op's torch
    reference and the compile report lists it as a fallback with the reasons; "error" raises UnknownOpError
    naming the op, the node and the reasons (the backend's pipeline legalizes what it has no lowering for).
Nothing falls back silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dsgraph.errors import UnknownOpError
from dsgraph.ir import Node

FALLBACKS = ("reference", "error")


@dataclass
class Lowered:
    """What a lowering made of a node (or of the region `nodes` rooted at it) and how the report names it.
    Backends subclass it with their payload (a step function, Relax expressions, ONNX nodes)."""

    kind: str
    kernel: str
    note: str = ""
    nodes: tuple[Node, ...] = ()


@dataclass(frozen=True)
class Decline:
    """A lowering that does not apply to this node, and why (shown in the report if no candidate applies)."""

    reason: str


Lowering = Callable[[object, Node], "Lowered | Decline"]


class LoweringTable:
    """op name -> candidate lowerings, with the duplicate and fallback policies above."""

    def __init__(self, backend: str, fallback: str):
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        self.backend = backend
        self.fallback = fallback
        self._table: dict[str, list[Lowering]] = {}

    def register(self, *ops: str):
        """Decorator: add the function as a candidate lowering of each op in `ops`."""
        def deco(fn: Lowering) -> Lowering:
            for op in ops:
                cands = self._table.setdefault(op, [])
                if fn in cands:
                    raise ValueError(f"{self.backend} lowering {fn.__qualname__} registered twice for {op!r}")
                cands.append(fn)
            return fn
        return deco

    def candidates(self, op: str) -> list[Lowering]:
        return list(self._table.get(op, ()))

    def ops(self) -> frozenset[str]:
        return frozenset(self._table)

    def lower(self, ctx, node: Node) -> tuple[Lowered | None, list[str]]:
        """Try the candidates in order: (the first Lowered, []) or (None, every reason). With fallback "error",
        no applicable lowering raises instead of returning None."""
        reasons = []
        for fn in self._table.get(node.op, ()):
            out = fn(ctx, node)
            if isinstance(out, Decline):
                reasons.append(out.reason)
            elif out is not None:
                return out, reasons
            else:
                raise TypeError(f"{self.backend} lowering {fn.__qualname__} returned None for {node.op}; "
                                "return Decline(reason) when it does not apply")
        if not self._table.get(node.op):
            reasons.append(f"no {self.backend} lowering for {node.op}")
        if self.fallback == "error":
            raise UnknownOpError(f"{self.backend} backend cannot lower {node.format(6)}: {'; '.join(reasons)}; "
                                 f"run the 'legalize' pass first to decompose it into primitives")
        return None, reasons
