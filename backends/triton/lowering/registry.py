"""What is triton-specific in the lowering protocol of backends/lowering.py: the table and the step payload.

    @TABLE.register("norm.rms")
    def _(ctx, node):
        src = ctx.generated(codegen.rowwise.rms_norm(...), node)
        return Lowered("generated", src.name, fn=lambda args, sym: [src(*args)])

A lowering returns a `Lowered` (a runnable step plus its report entry) or `Decline(reason)` when it does not
apply (say, a dtype the kernel lacks); the table tries the next lowering registered for the op and, last, the
torch reference — a `fallback` entry in the compile report with every candidate's reason, never silent. A
lowering may claim more nodes than the one it was called on (a fused region); `LowerCtx.region_ok` checks that
doing so keeps the program valid.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dsgraph.backends import lowering as protocol

from dsgraph.interpreter import StepFn
from dsgraph.ir import Node, Value

TABLE = protocol.LoweringTable("triton", fallback="reference")


@dataclass(kw_only=True)
class Lowered(protocol.Lowered):
    """A step of the lowered program and how the report describes it.

    `fn(args, sym)` gets the tensors of `inputs` (default: the node's inputs) and the bound symbols, and returns
    the tensors of `outputs` (default: the node's outputs). `nodes` lists every node the step implements (default:
    the node alone).
    """

    fn: StepFn
    inputs: tuple[Value, ...] | None = None
    outputs: tuple[Value, ...] | None = None


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
