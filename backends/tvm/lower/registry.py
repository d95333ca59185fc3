"""What is TVM-specific in the lowering protocol of backends/lowering.py: the table and the Relax payload.

    @TABLE.register("norm.rms")
    def _(ctx, node):
        x, weight = ctx.inputs(node)
        return Lowered("relax", "relax.nn.rms_norm",
                       outputs=[ctx.emit(relax.op.nn.rms_norm(x, weight, [-1], node.attrs["eps"]))])

A lowering reads the Relax expressions of the node's inputs from the context and returns a `Lowered`: one Relax
expression per node output plus how the compile report describes it — kind "relax" when it emits Relax built-in
ops (legalised by TVM's own TOPI rules), "tir" when it emits a TE/TIR function written here for an op Relax has
nothing fitting for. One module per op family registers its lowerings on import. The fallback policy is "error":
the backend legalizes (decomposes) the domain ops nothing here lowers before translating, so a node no lowering
takes is an UnknownOpError naming it and every candidate's reason.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsgraph.backends import lowering as protocol

TABLE = protocol.LoweringTable("tvm", fallback="error")


@dataclass(kw_only=True)
class Lowered(protocol.Lowered):
    """The Relax expressions of the node's outputs, in order (kind: "relax" | "tir")."""

    outputs: list
