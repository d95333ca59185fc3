"""The one executor base, and with its default plan the eager interpreter: the oracle every pass and backend is
checked against.

Like torch.fx's Interpreter, `Interpreter.run` owns what every executor needs and nothing else: it checks the
inputs against their types (binding the symbolic dims), walks a plan of `Step`s (by default one per node, running
the op's torch reference), calls the overridable `run_step` for each, checks what a step returned against its
outputs' types, re-raises a failure naming the step, frees values after their last use and, with `record=True`,
keeps every value so a harness can find the first node where two runs diverge. Backends extend it rather than
copy it: the triton backend's `Program` runs its lowered steps (a kernel, or a fused region) through it, the
torch_compile backend's `GraphFunction` keeps its steps and constants and replaces only the hot loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .dtypes import to_torch
from .errors import CheckpointError, DSGraphError, InputError
from .ir import Graph, Node, Value
from .ops.registry import get_op
from .symbolic import eval_dim, parse_dim
from .types import bind_symbols

StepFn = Callable[[list, dict], list]  # (argument tensors, symbol env) -> output tensors


@dataclass
class Step:
    """One unit of a plan: `fn` maps the tensors of `inputs` (and the bound symbols) to those of `outputs`.
    The eager plan has one per node; a backend's plan has one per kernel (a fused region is one step)."""

    fn: StepFn
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    label: str  # names the step in errors: the node as printed, or "op -> %out"


class Interpreter:
    """Runs `graph` on `device`: `steps` (default: `node_step` of every node) over the runtime inputs and
    `consts` (id(value) -> tensor; default: the params the steps read, from `weights`, loaded at the first run
    and cast to their declared dtype). `optional_inputs` are named values beyond the graph's inputs that a call
    may leave out (then bound to None): per-call step arguments such as the CUDA-graph decode lengths."""

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor] | None = None,
                 device: str | torch.device = "cpu", steps: list[Step] | None = None,
                 consts: dict[int, torch.Tensor] | None = None, optional_inputs: Mapping[str, Value] | None = None):
        self.graph = graph
        self.weights = weights if weights is not None else {}
        self.device = torch.device(device)
        self.runtime_inputs = {n: v for n, v in graph.inputs.items() if v.kind != "param"}
        self.optional_inputs = dict(optional_inputs or {})
        self.steps = list(steps) if steps is not None else [self.node_step(n) for n in graph.nodes]
        self._consts = consts
        outputs = {id(v) for v in graph.outputs.values()}
        read = outputs | {id(v) for s in self.steps for v in s.inputs}
        self._params = [v for v in graph.params().values() if id(v) in read]
        self._free_after = _free_lists(self.steps, outputs | (set(consts) if consts is not None else
                                                              {id(v) for v in self._params}))

    # the plan ------------------------------------------------------------------------------------
    def node_step(self, node: Node) -> Step:
        """How a node of the default plan runs: its torch reference (fx's `run_node`); a node without inputs (a
        literal) has nothing to take its device from, so its outputs are moved to the interpreter's."""
        fn = reference_fn(node)
        if not node.inputs:
            fn = _on_device(fn, self.device)
        return Step(fn, node.inputs, node.outputs, node.format(6))

    @property
    def consts(self) -> dict[int, torch.Tensor]:
        if self._consts is None:
            self._consts = {id(v): load_param(v, self.weights, self.device) for v in self._params}
        return self._consts

    # running -------------------------------------------------------------------------------------
    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Check names, tensors, dtypes and shapes of `inputs`; returns the symbols their shapes bind."""
        missing = [n for n in self.runtime_inputs if n not in inputs]
        if missing:
            raise InputError(f"graph {self.graph.name} needs inputs {missing}; got {sorted(inputs)}")
        unknown = set(inputs) - set(self.runtime_inputs) - set(self.optional_inputs)
        if unknown:
            raise InputError(f"graph {self.graph.name} has no inputs {sorted(unknown)}; "
                             f"its inputs are {[*self.runtime_inputs, *self.optional_inputs]}")
        sym: dict[str, int] = {}
        for name, v in [*self.runtime_inputs.items(), *self.optional_inputs.items()]:
            t = inputs.get(name)
            if t is None and name in self.optional_inputs:
                continue
            if not isinstance(t, torch.Tensor):
                raise InputError(f"input {name!r} must be a torch.Tensor, got {type(t).__name__}")
            bind_symbols(v.type, t, sym, f"input %{name}")
        return sym

    def run_step(self, step: Step, args: list, sym: dict[str, int]) -> list:
        """Run one step (the override point: time it, trace it, swap its kernel)."""
        return step.fn(args, sym)

    def run(self, inputs: Mapping[str, torch.Tensor], record: bool = False):
        """{output name: tensor}; with `record`, also {value name: tensor} of every input, constant and step
        output."""
        sym = self.check_inputs(inputs)
        env: dict[int, torch.Tensor | None] = dict(self.consts)
        for name, v in [*self.runtime_inputs.items(), *self.optional_inputs.items()]:
            t = inputs.get(name)
            env[id(v)] = None if t is None else t.to(self.device)
        recorded = _graph_values(self.graph, env) if record else None
        for i, step in enumerate(self.steps):
            args = [env[id(v)] for v in step.inputs]
            outs = _checked(self.run_step, step, args, sym)
            for v, t in zip(step.outputs, outs):
                env[id(v)] = t
            if record:
                recorded.update((v.name, t) for v, t in zip(step.outputs, outs))
            for key in self._free_after[i]:
                env.pop(key, None)
        result = {k: env[id(v)] for k, v in self.graph.outputs.items()}
        return (result, recorded) if record else result

    def __call__(self, inputs: Mapping[str, torch.Tensor], record: bool = False):
        return self.run(inputs, record)


def _on_device(fn: StepFn, device: torch.device) -> StepFn:
    return lambda args, sym: [t.to(device) for t in fn(args, sym)]


def _free_lists(steps: list[Step], keep: set[int]) -> list[list[int]]:
    """For each step, the values to drop after it: inputs read for the last time, outputs nothing reads."""
    last: dict[int, int] = {}
    for i, step in enumerate(steps):
        for v in step.outputs:
            last.setdefault(id(v), i)
        for v in step.inputs:
            last[id(v)] = i
    free: list[list[int]] = [[] for _ in steps]
    for key, i in last.items():
        if key not in keep:
            free[i].append(key)
    return free


def _graph_values(graph: Graph, env: dict) -> dict[str, torch.Tensor]:
    values = [*graph.inputs.values(), *(v for n in graph.nodes for v in n.outputs)]
    return {v.name: env[id(v)] for v in values if env.get(id(v)) is not None}


def _checked(run_step: Callable[[Step, list, dict], list], step: Step, args: list, sym: dict[str, int]) -> list:
    """`run_step(step, args, sym)`, its outputs checked against their types (binding symbols); any failure names
    the step."""
    try:
        outs = run_step(step, args, sym)
        if len(outs) != len(step.outputs):
            raise DSGraphError(f"returned {len(outs)} outputs, expected {len(step.outputs)}")
        for v, t in zip(step.outputs, outs):
            bind_symbols(v.type, t, sym, f"output %{v.name}")
    except DSGraphError as e:
        raise type(e)(f"while executing {step.label}: {e}") from None
    except Exception as e:  # a reference or kernel failing on real data is a bug worth locating
        raise DSGraphError(f"while executing {step.label}: {type(e).__name__}: {e}") from e
    return outs


def _call(step: Step, args: list, sym: dict[str, int]) -> list:
    return step.fn(args, sym)


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


def reference_fn(node: Node, impl: Callable | None = None) -> StepFn:
    """The step function of `node`'s torch reference (or of `impl`, a wrapped reference): shape attributes
    evaluated under the bound symbols, float outputs cast to the declared dtype (references compute in fp32)."""
    opdef = get_op(node.op)
    impl = impl or opdef.reference_fn
    attrs, shape_attrs = dict(node.attrs), opdef.shape_attrs
    dtypes = [to_torch(v.type.dtype) for v in node.outputs]

    def run(args: list, sym: dict) -> list:
        kw = attrs
        if shape_attrs:
            kw = dict(attrs)
            for key in shape_attrs:
                kw[key] = tuple(eval_dim(parse_dim(d), sym) for d in attrs[key])
        out = impl(*args, **kw)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        return [t.to(dt) if t.dtype != dt and t.is_floating_point() and dt.is_floating_point else t
                for t, dt in zip(outs, dtypes)] + outs[len(dtypes):]
    return run


def run_node(node: Node, args: list[torch.Tensor], env: dict[str, int]) -> list[torch.Tensor]:
    """Run one node's reference outside a plan (constant folding, localize) and check its outputs; failures name
    the node."""
    step = Step(reference_fn(node), node.inputs, node.outputs, node.format(6))
    return _checked(_call, step, args, env)


def run(graph: Graph, weights, inputs, device="cpu", record: bool = False):
    """One-shot helper: Interpreter(graph, weights, device).run(inputs, record)."""
    return Interpreter(graph, weights, device).run(inputs, record=record)
