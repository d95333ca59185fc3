"""The proof harness: run the interpreter on a graph before and after a pass (or a
pipeline) on fresh random inputs and compare, for the prefill step and — when the
graph has KV caches — one cached decode step.

Passes may change the cache layout (absorb_mla swaps per-head K/V for the latent
cache), so each graph's decode step is fed the caches its own prefill produced, and
only outputs present in both graphs with the same type are compared. When outputs
diverge, the harness names the first diverging node of the rewritten graph: it
compares every intermediate, in topological order, with the original's value of
the same name or of the value the node replaced (`node.meta["replaces"]`, which the
pattern engine, legalize and fold_constants stamp on the nodes they build).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsgraph.dtypes import to_torch
from dsgraph.errors import PassError
from dsgraph.interpreter import Interpreter
from dsgraph.ir import Graph
from dsgraph.numerics import TOLERANCE, rel_err
from dsgraph.weights import WeightStore

from .base import info, list_passes
from .manager import run_pipeline

OTHER_DIM = 7  # size given to symbols other than B (batch) and S (new tokens): odd on purpose
@dataclass
class CheckResult:
    """Per-output relative errors for each step, the tolerance, and the first diverging node if any."""

    pipeline: list[str]
    rtol: float
    errors: dict[str, float] = field(default_factory=dict)       # "prefill:logits" -> rel err
    first_divergence: str | None = None
    records: list = field(default_factory=list)
    changed: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.errors) and all(e <= self.rtol for e in self.errors.values())

    def report(self) -> str:
        lines = [f"check {self.pipeline}: {'OK' if self.ok else 'FAILED'} (rtol {self.rtol:g}, "
                 f"graph {'changed' if self.changed else 'unchanged'})"]
        lines += [f"  {k:<40} rel err {e:.3g}{'  <-- exceeds' if e > self.rtol else ''}"
                  for k, e in self.errors.items()]
        lines += [f"  problem: {p}" for p in self.problems]
        if self.first_divergence:
            lines.append(f"  first diverging node: {self.first_divergence}")
        return "\n".join(lines)

    __str__ = report

    def raise_if_failed(self) -> "CheckResult":
        if not self.ok:
            raise PassError(self.report())
        return self


def _tolerance(graph: Graph, names: list[str]) -> float:
    """The dtype's pass tolerance, widened to what a lossy pass of the pipeline declares (class attribute
    `tolerance`, e.g. fp8_latent_cache's FP8 rounding)."""
    dts = {v.type.dtype for v in graph.values() if v.type.is_float and v.kind != "param"}
    table = TOLERANCE["pass"]
    registered = list_passes()
    lossy = [getattr(info(n).factory, "tolerance", 0.0) for n in names if n in registered]
    return max(([table.get(d, table["float32"]) for d in dts] or [table["float32"]]) + lossy)


def _vocab(graph: Graph, weights, name: str) -> int:
    """Ids below the rows of the table the input indexes (Janus' image codes index a codebook, not the vocab)."""
    for node in graph.inputs[name].users:
        if node.op == "embed":
            return int(node.inputs[1].shape[0])
    if graph.meta.get("vocab_size"):
        return int(graph.meta["vocab_size"])
    return 2


def make_inputs(graphs: list[Graph], weights, batch: int, seq: int, start: int, gen: torch.Generator) -> dict:
    """Random activations for the union of the graphs' activation inputs: ids within the vocab,
    positions start..start+seq-1, anything else standard normal; symbols besides B and S get OTHER_DIM."""
    out: dict[str, torch.Tensor] = {}
    env = {"B": batch, "S": seq}
    for g in graphs:
        for name, v in g.activations().items():
            if name in out:
                continue
            for sym in sorted(v.type.symbols() - env.keys()):
                env[sym] = OTHER_DIM
            shape = v.type.concrete(env)
            if name == "positions":
                out[name] = torch.arange(start, start + seq).expand(batch, seq).contiguous().to(to_torch(v.dtype))
            elif not v.type.is_float:
                out[name] = torch.randint(0, _vocab(g, weights, name), shape, generator=gen).to(to_torch(v.dtype))
            else:
                out[name] = torch.randn(shape, generator=gen).to(to_torch(v.dtype))
    return out


def _empty_caches(graph: Graph, batch: int) -> dict:
    return {n: torch.zeros(v.type.concrete({"B": batch, "T": 0}), dtype=to_torch(v.dtype))
            for n, v in graph.caches().items()}


def _feed(graph: Graph, acts: dict, caches: dict) -> dict:
    """The graph's inputs; float activations (pixels, image features) in the graph's own dtype (retype changes it)."""
    own = {k: t.to(to_torch(graph.inputs[k].dtype)) if t.is_floating_point() else t
           for k, t in acts.items() if k in graph.inputs}
    return {**own, **caches}


def _first_divergence(before: Graph, after: Graph, rec0: dict, rec1: dict, rtol: float) -> str | None:
    for node in after.nodes:
        for v in node.outputs:
            ref_name = node.meta.get("replaces", {}).get(str(v.index), v.name)
            if ref_name not in rec0 or v.name not in rec1:
                continue
            a, r = rec1[v.name], rec0[ref_name]
            if a.shape != r.shape:
                continue
            err = rel_err(a, r)
            if err > rtol:
                via = "" if ref_name == v.name else f" (replaces %{ref_name} of the original)"
                return f"{node.format(6)}{via}: rel err {err:.3g}"
    return None


def check(pass_or_pipeline, graph: Graph, weights: WeightStore, inputs: dict | None = None,
          rtol: float | None = None, decode: bool = True, batch: int = 2, seq: int = 5, seed: int = 0) -> CheckResult:
    """Prove a pass (a name, a Pass, or a pipeline list) on `graph` numerically; see the module docstring.

    Returns a CheckResult (`.ok`, `.report()`, `.raise_if_failed()`); a pass that raises or leaves an
    invalid graph raises PassError from run_pipeline.
    """
    spec = pass_or_pipeline if isinstance(pass_or_pipeline, list) else [pass_or_pipeline]
    after, weights1, records = run_pipeline(graph, weights, spec)
    names = [r.name for r in records]
    # a pass that lowers precision (retype) is held to the less precise graph's tolerance, a lossy one to its own
    res = CheckResult(names, rtol if rtol is not None else max(_tolerance(graph, names), _tolerance(after, names)),
                      records=records,
                      changed=any(r.changed for r in records))
    gen = torch.Generator().manual_seed(seed)
    acts = inputs if inputs is not None else make_inputs([graph, after], weights, batch, seq, 0, gen)
    if inputs is not None:
        batch = next(iter(inputs.values())).shape[0]
        seq = inputs["positions"].shape[1] if "positions" in inputs else seq
    i0, i1 = Interpreter(graph, weights), Interpreter(after, weights1)
    c0 = {k: t for k, t in acts.items() if k in graph.caches()} or _empty_caches(graph, batch)
    c1 = {k: t for k, t in acts.items() if k in after.caches()} or _empty_caches(after, batch)
    steps = [("prefill", acts, c0, c1)]
    with torch.no_grad():
        while steps:
            step, a, c0, c1 = steps.pop(0)
            (o0, r0), (o1, r1) = i0.run(_feed(graph, a, c0), record=True), i1.run(_feed(after, a, c1), record=True)
            common = [k for k in o0 if k in o1 and o0[k].shape == o1[k].shape]
            if not common:
                res.problems.append(f"{step}: no output in common to compare ({list(o0)} vs {list(o1)})")
            for k in common:
                res.errors[f"{step}:{k}"] = rel_err(o1[k], o0[k])
            if res.first_divergence is None and any(res.errors[f"{step}:{k}"] > res.rtol for k in common):
                res.first_divergence = f"[{step}] " + (_first_divergence(graph, after, r0, r1, res.rtol)
                                                       or "no intermediate diverges (only outputs differ)")
            if step == "prefill" and decode and graph.cache_map and after.cache_map:
                nxt = make_inputs([graph, after], weights, batch, 1, seq, gen)
                steps.append(("decode", nxt, {k: o0[v] for k, v in graph.cache_map.items()},
                              {k: o1[v] for k, v in after.cache_map.items()}))
    return res
