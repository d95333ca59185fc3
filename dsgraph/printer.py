"""Readable text form: one line per input, one per node, one per output."""
from __future__ import annotations


def format_graph(graph, max_inputs: int = 12) -> str:
    lines = [f"graph {graph.name} ("]
    for v in graph.inputs.values():
        lines.append(f"  %{v.name}: {v.type}  [{v.kind}]")
    lines.append(") {")
    for node in graph.nodes:
        lines.append("  " + node.format(max_inputs))
    outs = ", ".join(f"{k}=%{v.name}" for k, v in graph.outputs.items())
    lines.append(f"  return {outs}")
    lines.append("}")
    return "\n".join(lines)
