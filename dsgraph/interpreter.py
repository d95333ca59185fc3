"""The eager interpreter: the oracle every pass and backend is checked against.

It runs a verified graph node by node through each op's torch reference, like
torch.fx's Interpreter: inputs are checked against their types (binding the
symbolic dims), every failure is re-raised naming the node that failed, and
with `record=True` every intermediate value is kept so a harness can find the
first node where two runs diverge.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .dtypes import dtype_name, to_torch
from .errors import CheckpointError, DSGraphError, InputError, ShapeError
from .ir import Graph, Node
from .ops.registry import get_op
from .symbolic import eval_dim, parse_dim
from .types import bind_symbols


class Interpreter:
    """Runs `graph` with `weights` on `device`; params are cast to their declared dtype once."""

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor], device: str | torch.device = "cpu"):
        self.graph = graph
        self.weights = weights
        self.device = torch.device(device)
        self._params: dict[str, torch.Tensor] = {}
        self._last_use = self._compute_last_use()

    def _compute_last_use(self) -> dict[int, int]:
        last: dict[int, int] = {}
        for i, node in enumerate(self.graph.nodes):
            for v in node.inputs:
                last[id(v)] = i
        return last

    def param(self, name: str) -> torch.Tensor:
        if name not in self._params:
            self._params[name] = load_param(self.graph.inputs[name], self.weights, self.device)
        return self._params[name]

    def run(self, inputs: Mapping[str, torch.Tensor], record: bool = False):
        """Execute; returns {output name: tensor}, plus {value name: tensor} for all values if record."""
        env: dict[str, int] = {}
        vals: dict[int, torch.Tensor] = {}
        recorded: dict[str, torch.Tensor] = {}
        missing = [n for n, v in self.graph.inputs.items() if v.kind != "param" and n not in inputs]
        if missing:
            raise InputError(f"graph {self.graph.name} needs inputs {missing}; got {sorted(inputs)}")
        unknown = set(inputs) - set(self.graph.inputs)
        if unknown:
            raise InputError(f"graph {self.graph.name} has no inputs {sorted(unknown)}; "
                             f"its inputs are {[n for n, v in self.graph.inputs.items() if v.kind != 'param']}")
        for name, v in self.graph.inputs.items():
            if v.kind == "param":
                t = self.param(name)
            else:
                t = inputs[name]
                if not isinstance(t, torch.Tensor):
                    raise InputError(f"input {name!r} must be a torch.Tensor, got {type(t).__name__}")
                bind_symbols(v.type, t, env, f"input %{name}")
                t = t.to(self.device)
            vals[id(v)] = t
            if record:
                recorded[name] = t
        for i, node in enumerate(self.graph.nodes):
            outs = run_node(node, [vals[id(v)] for v in node.inputs], env)
            for v, t in zip(node.outputs, outs):
                vals[id(v)] = t
                if record:
                    recorded[v.name] = t
            if not record:
                for v in node.inputs:
                    if self._last_use.get(id(v)) == i and v.node is not None \
                            and v not in self.graph.outputs.values():
                        vals.pop(id(v), None)
        result = {k: vals[id(v)] for k, v in self.graph.outputs.items()}
        return (result, recorded) if record else result


def load_param(value, weights: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Fetch a weight, check its shape, and cast it to the param's dtype on `device`."""
    if value.name not in weights:
        raise CheckpointError(f"weight {value.name!r} is missing (param of type {value.type}); "
                              "load a checkpoint that has it or build the model with random weights")
    t = weights[value.name]
    want = value.type.concrete({})
    if tuple(t.shape) != want:
        raise CheckpointError(f"weight {value.name!r} has shape {tuple(t.shape)}, "
                              f"the graph expects {want}")
    return t.to(device=device, dtype=to_torch(value.type.dtype))


def run_node(node: Node, args: list[torch.Tensor], env: dict[str, int]) -> list[torch.Tensor]:
    """Run one node's reference and check its outputs against the node's types."""
    opdef = get_op(node.op)
    attrs = node.attrs
    if opdef.shape_attrs:
        attrs = dict(attrs)
        for key in opdef.shape_attrs:
            attrs[key] = tuple(eval_dim(parse_dim(d), env) for d in attrs[key])
    try:
        out = opdef.reference_fn(*args, **attrs)
    except DSGraphError as e:
        raise type(e)(f"while executing {node.format(6)}: {e}") from None
    except Exception as e:  # a reference failing on real data is a bug worth locating
        raise DSGraphError(f"while executing {node.format(6)}: {type(e).__name__}: {e}") from e
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    checked = []
    for v, t in zip(node.outputs, outs):
        if t.dtype != to_torch(v.type.dtype):
            if not (t.is_floating_point() and v.type.is_float):
                raise ShapeError(f"while executing {node.format(6)}: reference returned "
                                 f"{dtype_name(t.dtype)} for %{v.name}: {v.type}")
            t = t.to(to_torch(v.type.dtype))
        bind_symbols(v.type, t, env, f"output %{v.name} of {node.op}")
        checked.append(t)
    return checked


def run(graph: Graph, weights, inputs, device="cpu", record: bool = False):
    """One-shot helper: Interpreter(graph, weights, device).run(inputs, record)."""
    return Interpreter(graph, weights, device).run(inputs, record=record)
