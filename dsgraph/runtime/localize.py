"""Find the kernel that is wrong: replay a backend's recorded step node by node through the op references."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsgraph import numerics
from dsgraph.interpreter import run_node
from dsgraph.numerics import rel_err
from dsgraph.types import bind_symbols


@dataclass
class NodeError:
    node: str        # the node, as the printer writes it
    error: float     # relative error of its float outputs, or the fraction of integer outputs that differ
    tolerance: float

    def __str__(self) -> str:
        return f"{self.error:.2e} (tolerance {self.tolerance:.0e})  {self.node}"


def localize(compiled, inputs, tolerance: float | None = None) -> list[NodeError]:
    """Replay every node whose outputs the backend materialised through the op's torch reference, fed the
    backend's own inputs; return the nodes whose outputs differ beyond `tolerance`, in graph order.

    Errors do not compound here: each node sees what the backend's kernel saw, so the first entry is the kernel
    that is wrong, not the place where drift became visible. A fused region's unmaterialised intermediates are
    recomputed by the references from the region's materialised inputs (weights reach kernels as step inputs,
    so the record holds every weight a region reads), so the region is judged as a whole at its outputs. Values
    the backend folded from weights at compile time ran through the references already and are not judged.
    Integer outputs (expert ids) count the fraction that differ."""
    graph = compiled.graph
    _, seen = compiled.run(inputs, record=True)
    tolerance = tolerance or numerics.tolerance(compiled.report.dtype)
    env: dict[str, int] = {}
    for name, v in graph.inputs.items():
        if name in seen:
            bind_symbols(v.type, seen[name], env, f"input %{name}")
    producer = {v.name: n for n in graph.nodes for v in n.outputs}
    replayed: dict[str, torch.Tensor] = {}

    def value(v) -> torch.Tensor | None:
        """The backend's tensor where it has one, else the reference's recomputation from such tensors; None for
        what only compile-time folding read (a weight no step takes, and what was computed from it)."""
        if v.name in seen:
            return seen[v.name]
        if v.name not in replayed:
            node = producer.get(v.name)  # None: a param no step read
            args = [value(a) for a in node.inputs] if node is not None else [None]
            if any(a is None for a in args):
                replayed[v.name] = None
            else:
                replayed.update(zip((out.name for out in node.outputs), run_node(node, args, dict(env))))
        return replayed[v.name]

    bad = []
    for node in graph.nodes:
        if not all(v.name in seen for v in node.outputs):
            continue  # inside a fused region: judged through the region's outputs
        args = [value(v) for v in node.inputs]
        if any(a is None for a in args):
            continue  # folded from weights at compile time (by the references themselves)
        ref = run_node(node, args, dict(env))
        worst = 0.0
        for v, r in zip(node.outputs, ref):
            got = seen[v.name].to(r.device)
            worst = max(worst, rel_err(got, r) if r.is_floating_point() else float((got != r).float().mean()))
        if worst > tolerance:
            bad.append(NodeError(node.format(6), worst, tolerance))
    return bad
