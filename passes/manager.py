"""Pipelines: an explicit list of passes run in order, verifying after each (TVM
`Sequential` under a `PassContext`, fx `PassManager`).

A pipeline is "none" or a list whose items are pass names, `(name, {options})` pairs or Pass instances.
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
from dsgraph.progress import MIN_NODES, track
from dsgraph.weights import WeightStore

from .base import Pass, get


def with_options(name: str, names: list, options: dict) -> list:
    """`names` with some of its passes set to run with options, in place (`{"group_moe": {...}}`); a pass that is
    not in the list is an error naming the pipeline `name`."""
    missing = sorted(set(options) - set(names))
    if missing:
        raise PassError(f"{name} pipeline: {', '.join(missing)} is not in it {names}")
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


def resolve(pipeline) -> list[Pass]:
    """Turn a pipeline spec into pass instances (checks every name before anything runs)."""
    if pipeline is None or pipeline == "none":
        return []
    if pipeline == "default":
        raise PassError("pipeline 'default' is a backend's: pass get_backend(name).default_pipeline(), or "
                        "dsgraph.compile_graph(graph, weights, backend)")
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
                 disabled=(), verify: bool = True, out=print):
    """Run `pipeline` on (graph, weights); returns (graph, weights, [PassRecord]). Inputs are untouched."""
    passes = [p for p in resolve(pipeline) if p.name not in set(disabled)]
    if dump_after is not None and dump_after not in {p.name for p in passes}:
        raise PassError(f"--dump-after {dump_after!r}: no such pass in the pipeline "
                        f"{[p.name for p in passes]}")
    weights = weights if weights is not None else WeightStore()
    records: list[PassRecord] = []
    for p in track(passes, "passes", unit="pass", long=len(graph.nodes) >= MIN_NODES, name=lambda p: p.name):
        before = [r.name for r in records]
        params0, ops0, n0 = set(graph.params()), Counter(n.op for n in graph.nodes), len(graph.nodes)
        t0 = time.perf_counter()
        try:
            result = p(graph, weights)
            if verify:
                result.graph.verify()
        except DSGraphError as e:
            raise PassError(f"pass {p.name!r} failed (after {before or 'no passes'}): {e}") from e
        except Exception as e:  # a bug in the pass (or a graph it was not written for): name the pass
            raise PassError(f"pass {p.name!r} raised {type(e).__name__}: {e} (after {before or 'no passes'}); "
                            "leave it out of the pipeline (passes=[...]) or report the bug") from e
        secs = time.perf_counter() - t0
        graph, weights = result.graph, result.weights
        params1, ops1 = set(graph.params()), Counter(n.op for n in graph.nodes)
        delta = {op: ops1[op] - ops0[op] for op in ops0 | ops1 if ops1[op] != ops0[op]}
        records.append(PassRecord(p.name, p.options(), result.changed, result.stats, n0, len(graph.nodes),
                                  sorted(params1 - params0), sorted(params0 - params1), secs, delta))
        if p.name == dump_after:
            out(f"// graph after {p.name}\n{graph}")
    return graph, weights, records
