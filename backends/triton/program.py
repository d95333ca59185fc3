"""The lowered program: an ordered list of steps over a flat value environment, with weights bound.

`run` checks inputs like the eager interpreter (names, dtypes, symbolic dims bound through `bind_symbols`), runs
every step, checks each step's outputs against the node types (a kernel returning the wrong dtype or shape is a
backend bug and must surface at once, naming the node), frees values after their last use, and returns the
graph's outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from dsgraph.errors import DSGraphError, InputError
from dsgraph.ir import Graph, Value
from dsgraph.types import bind_symbols

from .lowering.registry import StepFn


@dataclass
class Step:
    fn: StepFn
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    label: str  # "op -> %out" for error messages


class Program:
    def __init__(self, graph: Graph, steps: list[Step], consts: dict[int, torch.Tensor], device: torch.device):
        self.graph = graph
        self.steps = steps
        self.consts = consts
        self.device = device
        self.runtime_inputs = {n: v for n, v in graph.inputs.items() if v.kind != "param"}
        keep = {id(v) for v in graph.outputs.values()} | set(consts)
        last: dict[int, int] = {}
        for i, step in enumerate(steps):
            for v in step.inputs:
                last[id(v)] = i
        self._free_after = [[id(v) for v in {id(v): v for v in s.inputs}.values()
                             if last.get(id(v)) == i and id(v) not in keep] for i, s in enumerate(steps)]

    def __call__(self, inputs: Mapping[str, torch.Tensor], record: bool = False):
        """{output name: tensor}; with `record`, also {value name: tensor} of every input and step output."""
        missing = [n for n in self.runtime_inputs if n not in inputs]
        if missing:
            raise InputError(f"graph {self.graph.name} needs inputs {missing}; got {sorted(inputs)}")
        unknown = set(inputs) - set(self.runtime_inputs)
        if unknown:
            raise InputError(f"graph {self.graph.name} has no inputs {sorted(unknown)}; "
                             f"its inputs are {list(self.runtime_inputs)}")
        sym: dict[str, int] = {}
        env: dict[int, torch.Tensor] = dict(self.consts)
        for name, v in self.runtime_inputs.items():
            t = inputs[name]
            if not isinstance(t, torch.Tensor):
                raise InputError(f"input {name!r} must be a torch.Tensor, got {type(t).__name__}")
            bind_symbols(v.type, t, sym, f"input %{name}")
            env[id(v)] = t.to(self.device)
        recorded = None
        if record:  # inputs, params and weight-only values folded at compile time
            values = [*self.graph.inputs.values(), *(v for n in self.graph.nodes for v in n.outputs)]
            recorded = {v.name: env[id(v)] for v in values if id(v) in env}
        for i, step in enumerate(self.steps):
            try:
                outs = step.fn([env[id(v)] for v in step.inputs], sym)
            except DSGraphError as e:
                raise type(e)(f"while executing {step.label}: {e}") from None
            except Exception as e:
                raise DSGraphError(f"while executing {step.label}: {type(e).__name__}: {e}") from e
            if len(outs) != len(step.outputs):
                raise DSGraphError(f"while executing {step.label}: kernel returned {len(outs)} outputs, "
                                   f"expected {len(step.outputs)}")
            for v, t in zip(step.outputs, outs):
                bind_symbols(v.type, t, sym, f"output %{v.name} of {step.label} (triton backend)")
                env[id(v)] = t
                if record:
                    recorded[v.name] = t
            for key in self._free_after[i]:
                env.pop(key, None)
        result = {k: env[id(v)] for k, v in self.graph.outputs.items()}
        return (result, recorded) if record else result
