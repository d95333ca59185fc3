"""Pipelines: an explicit list of passes run in order, verifying after each (TVM
`Sequential` under a `PassContext`, fx `PassManager`).

A pipeline is "none", "default" (the backend's list, `default_pipeline(backend)`),
or a list whose items are pass names, `(name, {options})` pairs or Pass instances.
Each pass's effect is recorded (`PassRecord`) for the compile report; a pass that
raises or leaves an invalid graph fails with PassError naming it and the passes
that ran before it.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from dsgraph.errors import DSGraphError, PassError
from dsgraph.ir import Graph
from dsgraph.weights import WeightStore

from .base import Pass, get

# What each backend runs by default, in order. Backends append `legalize` with the set
# of domain ops they have kernels for (`("legalize", {"keep": {...}})`).
DEFAULT_PIPELINES: dict[str, list[str]] = {
    # the oracle runs graphs as the model wrote them
    "eager": [],
    # hand-tuned templates: absorbed-MLA decode over the latent cache, grouped-GEMM MoE with fused
    # routing, fused add+RMSNorm, SwiGLU over one gate|up GEMM
    "triton": ["cse", "fold_constants", "absorb_mla", "merge_qkv_a", "merge_qkv", "fuse_router", "group_moe",
               "fuse_add_rmsnorm", "fuse_swiglu", "dce"],
    "tvm": ["cse", "fold_constants", "absorb_mla", "fuse_router", "group_moe", "fuse_swiglu", "dce"],
    "torch_compile": ["cse", "fold_constants", "absorb_mla", "group_moe", "dce"],
    "onnx": ["cse", "fold_constants", "absorb_mla", "group_moe", "dce"],
}


def default_pipeline(backend: str, **options: dict) -> list:
    """The documented default pass list for `backend` (a copy); unknown backends get cleanups only. `options`
    sets passes of that list to run with options, in place:
    `default_pipeline("triton", group_moe={"fold_shared_experts": True})`."""
    names = list(DEFAULT_PIPELINES.get(backend, ["cse", "fold_constants", "dce"]))
    missing = sorted(set(options) - set(names))
    if missing:
        raise PassError(f"default_pipeline({backend!r}): {', '.join(missing)} is not in its pipeline {names}")
    return [(n, options[n]) if n in options else n for n in names]


@dataclass
class PassRecord:
    """What one pass did: rewrites, node and param deltas, time."""

    name: str
    options: dict
    changed: bool
    stats: dict
    nodes_before: int
    nodes_after: int
    params_added: list[str] = field(default_factory=list)
    params_removed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    ops_delta: dict = field(default_factory=dict)

    def summary(self) -> str:
        extra = {k: v for k, v in self.stats.items() if k not in ("rewritten", "matched") and v}
        parts = [f"rewritten={self.stats.get('rewritten', 0)}", f"nodes {self.nodes_before}->{self.nodes_after}"]
        if "matched" in self.stats:
            parts.insert(0, f"matched={self.stats['matched']}")
        if self.params_added or self.params_removed:
            parts.append(f"params +{len(self.params_added)} -{len(self.params_removed)}")
        parts += [f"{k}={v}" for k, v in extra.items()]
        parts.append(f"{self.seconds * 1e3:.1f} ms")
        return ", ".join(parts)


def resolve(pipeline, backend: str | None = None) -> list[Pass]:
    """Turn a pipeline spec into pass instances (checks every name before anything runs)."""
    if pipeline is None or pipeline == "none":
        return []
    if pipeline == "default":
        if backend is None:
            raise PassError("pipeline 'default' needs a backend name: run_pipeline(..., backend='triton')")
        pipeline = default_pipeline(backend)
    if isinstance(pipeline, (str, Pass)):
        pipeline = [pipeline]
    out = []
    for item in pipeline:
        if isinstance(item, Pass):
            out.append(item)
        elif isinstance(item, str):
            out.append(get(item))
        elif isinstance(item, tuple) and len(item) == 2:
            out.append(get(item[0], **item[1]))
        else:
            raise PassError(f"pipeline item {item!r} is not a pass name, (name, options) or Pass instance")
    return out


def run_pipeline(graph: Graph, weights: WeightStore | None, pipeline, dump_after: str | None = None,
                 disabled=(), verify: bool = True, backend: str | None = None, out=print):
    """Run `pipeline` on (graph, weights); returns (graph, weights, [PassRecord]). Inputs are untouched."""
    passes = [p for p in resolve(pipeline, backend) if p.name not in set(disabled)]
    if dump_after is not None and dump_after not in {p.name for p in passes}:
        raise PassError(f"--dump-after {dump_after!r}: no such pass in the pipeline "
                        f"{[p.name for p in passes]}")
    weights = weights if weights is not None else WeightStore()
    records: list[PassRecord] = []
    for p in passes:
        before = [r.name for r in records]
        params0, ops0, n0 = set(graph.params()), Counter(n.op for n in graph.nodes), len(graph.nodes)
        t0 = time.perf_counter()
        try:
            result = p(graph, weights)
            if verify:
                result.graph.verify()
        except DSGraphError as e:
            raise PassError(f"pass {p.name!r} failed (after {before or 'no passes'}): {e}") from e
        secs = time.perf_counter() - t0
        graph, weights = result.graph, result.weights
        params1, ops1 = set(graph.params()), Counter(n.op for n in graph.nodes)
        delta = {op: ops1[op] - ops0[op] for op in ops0 | ops1 if ops1[op] != ops0[op]}
        records.append(PassRecord(p.name, p.options(), result.changed, result.stats, n0, len(graph.nodes),
                                  sorted(params1 - params0), sorted(params0 - params1), secs, delta))
        if p.name == dump_after:
            out(f"// graph after {p.name}\n{graph}")
    return graph, weights, records
