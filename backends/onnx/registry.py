"""What is ONNX-specific in the lowering protocol of backends/lowering.py: the table and the converted payload.

    @TABLE.register("silu")
    def _(ctx, node):
        x, = ctx.inputs(node)
        return converted(ctx.emit("Mul", [x, ctx.emit("Sigmoid", [x], "sigmoid")], "silu"))

A converter (a lowering of this backend) reads the ONNX names of the node's inputs from the export context,
emits standard ONNX nodes through it and returns their output names, one per node output. The fallback policy is
"error": the exporter legalizes an op without a converter through its `.decomposition` before asking the table
(export.py), so a node the table cannot take is an UnknownOpError naming it and every candidate's reason.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsgraph.backends import lowering as protocol

TABLE = protocol.LoweringTable("onnx", fallback="error")


@dataclass(kw_only=True)
class Converted(protocol.Lowered):
    """The ONNX names of the node's outputs, in order; the exporter names the ONNX operators in `kernel`."""

    kind: str = "library"
    kernel: str = "onnxruntime"
    outputs: list[str]


def converted(outs: str | list[str] | tuple[str, ...]) -> Converted:
    """A converter's result from the name of its one output, or the list of names of several."""
    return Converted(outputs=list(outs) if isinstance(outs, (list, tuple)) else [outs])
