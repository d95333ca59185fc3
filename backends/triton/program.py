"""The lowered program: the executor base of dsgraph/interpreter.py over the lowered steps, weights bound.

Each step is a kernel (or a fused region, or a reported torch fallback) with the values it reads and writes;
`dsgraph.interpreter.Interpreter.run` checks the inputs (names, dtypes, symbolic dims), runs the steps, checks
each step's outputs against the node types (a kernel returning the wrong dtype or shape is a backend bug and must
surface at once, naming the step), frees values after their last use and returns the graph's outputs.
"""
from __future__ import annotations

from typing import Mapping

import torch

from dsgraph.interpreter import Interpreter, Step
from dsgraph.ir import Graph, Value


class Program(Interpreter):
    """`consts` maps id(value) to the weights and folded values the steps read; `optional_inputs` are the
    per-call step arguments a caller may pass beyond the graph's inputs (the static decode lengths)."""

    def __init__(self, graph: Graph, steps: list[Step], consts: dict[int, torch.Tensor], device: torch.device,
                 optional_inputs: Mapping[str, Value] | None = None):
        super().__init__(graph, device=device, steps=steps, consts=consts, optional_inputs=optional_inputs)
        self.sources: list = []  # the generated kernel sources (compiler.lower_graph sets them)
