"""The eager backend: the interpreter over each op's torch reference — the oracle."""
from __future__ import annotations

from dsgraph.interpreter import Interpreter

from .base import Backend, CompiledGraph, KernelChoice, register_backend


class EagerBackend(Backend):
    name = "eager"
    pipeline = ()  # the oracle runs graphs as the model wrote them

    def compile_graph(self, graph, weights, device, report, **options):
        interp = Interpreter(graph, weights, device)
        for node in graph.nodes:
            report.kernels.append(KernelChoice(tuple(v.name for v in node.outputs), node.op, "reference",
                                               f"torch reference of {node.op}"))
        return CompiledGraph(graph, interp.run, report, records=True)


register_backend("eager", EagerBackend)
