"""The TVM backend: each node lowered to Relax built-ins or to TE/TIR written for it (backends/tvm/lower/),
scheduled (dlight on CUDA, MetaSchedule records as an option), built for `llvm` or `cuda` (sm_90), exported
as a shared library and run by TVM's runtime alone.

    compiled = get_backend("tvm").compile(graph, weights, device="cpu")
    print(compiled.report)          # per node: relax | tir | fallback (legalized), build time, module size
    get_backend("tvm").save_compiled(compiled, "out/")   # module.so + program.json
    export_module(graph, "cuda", "out_cuda/")            # build for an H100 on a machine without one

Options of `compile`:
  passes   pipeline to run first when calling the backend directly ("default" = passes' "tvm" list);
           dsgraph.compile already runs `default_passes`
  tune     {"work_dir": DIR, "trials": N}: MetaSchedule tuning, records saved in DIR and reused (tune.py)
  work_dir where the exported module goes (default: a temporary directory kept with the CompiledGraph)

With $DSGRAPH_TVM_PREBUILT=DIR set, compiling loads modules built elsewhere instead (prebuilt.py).

Importing this package does not import TVM's compiler: loading a saved module works with the runtime only.
"""
from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

from dsgraph.errors import BackendUnavailable, DSGraphError

from ..base import Backend, CompiledGraph, CompileReport, KernelChoice, register_backend
from .env import INSTALL_HINT, unavailable_reason
from .prebuilt import ENV as PREBUILT_ENV
from .prebuilt import graph_key, prebuilt_root
from .runtime import load_program, save_program

REPORT = "report.json"


class TVMBackend(Backend):
    name = "tvm"

    @property
    def default_passes(self):
        """The passes package's "tvm" pipeline when it is installed; the lowering covers both MLA and MoE forms,
        so without it the graph compiles as written."""
        try:
            from dsgraph.passes import default_pipeline
        except ImportError:
            return "none"
        return default_pipeline("tvm")

    def available(self, device: str) -> str | None:
        if prebuilt_root() is not None:  # modules built elsewhere: TVM's runtime is enough
            if importlib.util.find_spec("tvm") is None:
                return f"apache-tvm is not installed; {INSTALL_HINT}"
            return None if prebuilt_root().is_dir() else f"${PREBUILT_ENV}={prebuilt_root()} is not a directory"
        return unavailable_reason(device)

    def compile_graph(self, graph, weights, device, report, passes=None, tune=None, work_dir=None, **options):
        if options:
            raise BackendUnavailable(f"tvm backend: unknown option(s) {sorted(options)}; known: passes, tune, work_dir")
        graph, weights = _run_passes(graph, weights, passes, report)
        if prebuilt_root() is not None:
            path = prebuilt_root() / graph_key(graph, device)
            if not (path / "module.so").exists():
                raise BackendUnavailable(
                    f"no prebuilt TVM module {path.name}: build it where TVM's compiler is, with `dsgraph bench "
                    f"MODEL --device {device} --prebuild DIR` and this run's workloads and dtype, into "
                    f"${PREBUILT_ENV} ({prebuilt_root()})")
            return self._load(path, graph, weights, device, report, f"loaded prebuilt module {path.name}")
        graph, origins = _legalize(graph, weights, report)
        from .compiler import compile_program
        built = compile_program(graph, device, tune, origins)
        report.kernels.extend(built.kernels)
        report.notes.extend(built.notes)
        tmp = None
        if work_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="dsgraph-tvm-")
            work_dir = tmp.name
        save_program(work_dir, built.executable, built.program)
        size = (Path(work_dir) / "module.so").stat().st_size
        report.notes.append(f"module.so {size / 1024:.0f} KiB")
        runner = load_program(work_dir, graph, weights, device)
        compiled = CompiledGraph(graph, runner.run, report)
        compiled.tvm = {"executable": built.executable, "program": built.program, "dir": work_dir, "tmp": tmp}
        return compiled

    def save_compiled(self, compiled, directory) -> None:
        save_program(directory, compiled.tvm["executable"], compiled.tvm["program"])
        (Path(directory) / REPORT).write_text(json.dumps(compiled.report.to_json()))

    def load_compiled(self, directory, graph, weights, device, dtype) -> CompiledGraph:
        """Runtime only: no lowering, no build — the exported module and its calling convention."""
        return self._load(directory, graph, weights, device, CompileReport(self.name, device, dtype),
                          "loaded a saved module")

    def _load(self, directory, graph, weights, device, report, note) -> CompiledGraph:
        runner = load_program(directory, graph, weights, device)
        saved = json.loads((Path(directory) / REPORT).read_text()) if (Path(directory) / REPORT).exists() else {}
        report.notes.extend(saved.get("notes", []) + [note])
        report.kernels.extend(KernelChoice(**{**k, "nodes": tuple(k["nodes"])}) for k in saved.get("kernels", []))
        compiled = CompiledGraph(graph, runner.run, report)
        compiled.tvm = {"executable": None, "program": runner.program, "dir": str(directory), "tmp": None}
        return compiled


def export_module(graph, device: str, directory, tune: dict | None = None) -> dict:
    """Build `graph` for `device` ("cpu" or "cuda" = sm_90) and write module.so + program.json to `directory`,
    without weights or a GPU; returns the report as JSON. Load it with `load_compiled` where it runs."""
    reason = unavailable_reason(device)
    if reason:
        raise BackendUnavailable(f"backend 'tvm' cannot build for {device}: {reason}")
    from .compiler import compile_program
    report = CompileReport("tvm", device, "n/a")
    graph, origins = _legalize(graph, None, report)
    built = compile_program(graph, device, tune, origins)
    report.kernels, report.notes = built.kernels, report.notes + built.notes
    save_program(directory, built.executable, built.program)
    report.notes.append(f"module.so {(Path(directory) / 'module.so').stat().st_size / 1024:.0f} KiB")
    (Path(directory) / REPORT).write_text(json.dumps(report.to_json()))
    return report.to_json()


def _run_passes(graph, weights, pipeline, report):
    if pipeline in (None, "none", ()):
        return graph, weights
    import dsgraph.passes as passlib
    graph, weights, records = passlib.run_pipeline(graph, weights, pipeline, backend="tvm")
    report.passes.extend((r.name, r.summary()) for r in records)
    return graph, weights


def _legalize(graph, weights, report):
    """Domain ops without a TVM lowering go through their decomposition (the passes package's `legalize`),
    reported as fallbacks; returns (graph, {origin output name: op}). Ops nothing can lower are left for
    the translator to name in an UnknownOpError."""
    from dsgraph.ops.registry import get_op

    from .lower import lowered_ops
    todo = [n for n in graph.nodes if n.op not in lowered_ops() and get_op(n.op).level == "domain"
            and get_op(n.op).decompose_fn is not None]
    if not todo:
        return graph, {}
    try:
        import dsgraph.passes as passlib
        legalize = passlib.get("legalize", keep=lowered_ops())
    except (ImportError, DSGraphError) as e:
        report.notes.append(f"no legalization available ({type(e).__name__}): {sorted({n.op for n in todo})} "
                            "cannot be lowered")
        return graph, {}
    origins = {n.outputs[0].name: n.op for n in todo}
    graph, _, records = passlib.run_pipeline(graph, weights, [legalize])
    report.passes.extend((r.name, r.summary()) for r in records)
    report.notes.append(f"legalized without a TVM kernel: {', '.join(sorted(set(origins.values())))}")
    return graph, origins


register_backend("tvm", TVMBackend)
