"""The backend contract.

A backend compiles a graph (after its own pass pipeline) into a `CompiledGraph`:
a function from named input tensors (activations and caches) to named outputs,
with weights bound at compile time. The `Executable` (backends/executable.py) adds
KV-cache handling and generation on top, identically for every backend.

Every node is mapped to a kernel through a registry and recorded in the
`CompileReport` as one `KernelChoice`: generated code, a hand-written template,
a named library call, or an explicit fallback. Nothing runs unreported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from dsgraph.passes import run_pipeline, with_options

from dsgraph.errors import BackendUnavailable, DSGraphError, UnknownOpError

KERNEL_KINDS = ("reference", "generated", "template", "library", "relax", "tir", "fallback")


@dataclass
class KernelChoice:
    """Which kernel runs a node (or fused region): kind is one of KERNEL_KINDS."""

    nodes: tuple[str, ...]  # output value names of the node(s) it implements
    op: str
    kind: str
    kernel: str
    note: str = ""


@dataclass
class CompileReport:
    backend: str
    device: str
    dtype: str
    passes: list = field(default_factory=list)      # [(pass name, summary dict)]
    kernels: list[KernelChoice] = field(default_factory=list)
    compile_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[KernelChoice]:
        return [k for k in self.kernels if k.kind == "fallback"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in self.kernels:
            out[k.kind] = out.get(k.kind, 0) + 1
        return out

    def __str__(self) -> str:
        """Node by node (full DeepSeek-V3 has ~47,000 nodes: `summary()` is the readable form)."""
        rows = []
        for k in self.kernels:
            where = k.nodes[0] if len(k.nodes) == 1 else f"{k.nodes[0]} (+{len(k.nodes) - 1})"
            rows.append(f"  {where:<40} {k.op:<24} {k.kind:<10} {k.kernel}{'  — ' + k.note if k.note else ''}")
        return self._framed(rows)

    def summary(self) -> str:
        """One line per (op, kernel): `linear ×247 → gemv (template)`."""
        groups: dict[tuple, int] = {}
        for k in self.kernels:
            groups[(k.op, k.kernel, k.kind)] = groups.get((k.op, k.kernel, k.kind), 0) + 1
        return self._framed([f"  {op} ×{n} → {kernel} ({kind})" for (op, kernel, kind), n in
                             sorted(groups.items(), key=lambda g: (-g[1], g[0]))])

    def _framed(self, kernel_rows: list[str]) -> str:
        lines = [f"backend {self.backend} on {self.device}, {self.dtype}, compiled in {self.compile_seconds:.2f}s"]
        if self.passes:
            lines.append("passes:")
            for name, info in self.passes:
                lines.append(f"  {name:<28} {info}")
        lines.append("kernels: " + ", ".join(f"{k}={n}" for k, n in sorted(self.counts().items())))
        lines.extend(kernel_rows)
        fb = self.fallbacks
        lines.append(f"fallbacks: {len(fb)}" + ("" if not fb else " — " + ", ".join(sorted({k.op for k in fb}))))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"backend": self.backend, "device": self.device, "dtype": self.dtype,
                "passes": [[n, i] for n, i in self.passes], "compile_seconds": self.compile_seconds,
                "kernels": [k.__dict__ for k in self.kernels], "notes": self.notes}


class CompiledGraph:
    """A graph bound to weights on a device; `run` maps input tensors to output tensors.

    Backends that execute the graph value by value (eager, triton) also pass `run_fn` a `record` flag: then
    `run(inputs, record=True)` returns (outputs, {value name: tensor}) for every value the backend materialised,
    which `dsgraph.app.check.localize` replays node by node to find the kernel that is wrong."""

    def __init__(self, graph, run_fn: Callable[..., dict], report: CompileReport, records: bool = False):
        self.graph = graph
        self._run = run_fn
        self.report = report
        self.records = records
        # optional faster path for one-token decode steps: (inputs, cached length) -> outputs, or None when the
        # plain `run` must take this step (the triton backend's CUDA graphs set it)
        self.decode_step: Callable[[Mapping[str, torch.Tensor], int], dict | None] | None = None
        # optional one-token steps of a whole serving batch over a paged cache (block pools, block tables, per-row
        # lengths; the triton backend's backends/triton/paged_decode.py); None: the engine gathers contiguous caches
        self.paged_decode = None

    def run(self, inputs: Mapping[str, torch.Tensor], record: bool = False):
        if not record:
            return self._run(inputs)
        if not self.records:
            raise DSGraphError(f"the {self.report.backend} backend runs the graph as a whole module: it cannot "
                               "record intermediate values; localise with the triton or eager backend")
        return self._run(inputs, record=True)


class Backend:
    """Subclasses set `name` and `pipeline` (the pass names `dsgraph.compile` runs first, in order) and implement
    `compile_graph`. Each backend owns its pipeline; the passes package knows no backend."""

    name = "base"
    pipeline: tuple[str, ...] = ("cse", "fold_constants", "dce")
    grows_caches_in_place = False  # cache.append writes into spare capacity (backends/kv_cache.py)

    def default_pipeline(self, **options: dict) -> list:
        """The backend's pass list, with `options` set on passes of it in place:
        `get_backend("triton").default_pipeline(group_moe={"fold_shared_experts": True})`."""
        return with_options(self.name, list(self.pipeline), options)

    def run_passes(self, graph, weights, pipeline, report):
        """A `passes` option of `compile_graph`: None or "none" (dsgraph.compile has run `pipeline` already),
        "default" (this backend's pipeline) or a list of pass names, run as given; recorded in the report."""
        if pipeline in (None, "none", ()):
            return graph, weights
        graph, weights, records = run_pipeline(graph, weights, self.default_pipeline() if pipeline == "default"
                                               else pipeline)
        report.passes.extend((r.name, r.summary()) for r in records)
        return graph, weights

    def available(self, device: str) -> str | None:
        """None if usable on `device`, else the reason with an install hint."""
        return None

    def compile_graph(self, graph, weights, device: str, report: CompileReport, **options) -> CompiledGraph:
        raise NotImplementedError

    def save_compiled(self, compiled: CompiledGraph, directory) -> None:
        """Write what loading needs to skip compilation (kernel sources, tuned configs, libraries)."""
        Path(directory).mkdir(parents=True, exist_ok=True)

    def load_compiled(self, directory, graph, weights, device: str, dtype: str) -> CompiledGraph:
        """Rebuild a CompiledGraph from `save_compiled` output; by default, compile again."""
        return self.compile(graph, weights, device=device, dtype=dtype)

    def compile(self, graph, weights, device: str = "cpu", dtype: str = "float32", **options) -> CompiledGraph:
        reason = self.available(device)
        if reason:
            raise BackendUnavailable(f"backend {self.name!r} cannot run on {device}: {reason}")
        report = CompileReport(self.name, device, dtype)
        t0 = time.perf_counter()
        compiled = self.compile_graph(graph, weights, device, report, **options)
        report.compile_seconds = time.perf_counter() - t0
        return compiled


_BACKENDS: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    _BACKENDS[name] = factory


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise UnknownOpError(f"unknown backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()


def backend_names() -> list[str]:
    """Every registered backend, available here or not."""
    return sorted(_BACKENDS)


def available_backends(device: str = "cpu") -> list[str]:
    """Backends that can run on `device` on this machine."""
    return [n for n, f in _BACKENDS.items() if f().available(device) is None]
