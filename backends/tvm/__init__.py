"""The TVM backend: each node lowered to Relax built-ins or to TE/TIR written for it (backends/tvm/lower/),
scheduled (dlight on CUDA, MetaSchedule records as an option), built for `llvm` or `cuda` (sm_90), exported
as a shared library and run by TVM's runtime alone.

    compiled = get_backend("tvm").compile(graph, weights, device="cpu")
    print(compiled.report)          # per node: relax | tir | fallback (legalized), build time, module size
    get_backend("tvm").save_compiled(compiled, "out/")   # module.so + program.json
    export_module(graph, "cuda", "out_cuda/")            # build for an H100 on a machine without one

Options of `compile`:
  passes   pipeline to run first when calling the backend directly ("default" = this backend's `pipeline`,
           or a list of pass names); dsgraph.compile has run `pipeline` already
  tune     {"work_dir": DIR, "trials": N}: MetaSchedule tuning, records saved in DIR and reused (tune.py)
  work_dir where the exported module goes (default: a temporary directory kept with the CompiledGraph)

With $DSGRAPH_TVM_PREBUILT=DIR set, compiling loads modules built elsewhere instead (prebuilt.py).

Importing this package does not import TVM (deps.py names its modules, imported at first use): loading a
saved module works with TVM's runtime only.
"""
from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

from dsgraph.errors import BackendUnavailable

from ..base import Backend, CompiledGraph, CompileReport, KernelChoice, register_backend
from .compiler import build_graph, export_module  # noqa: F401  (export_module: part of this package's API)
from .env import INSTALL_HINT, unavailable_reason
from .prebuilt import ENV as PREBUILT_ENV
from .prebuilt import graph_key, prebuilt_root
from .runtime import LIBRARY, REPORT, load_program, save_program


class TVMBackend(Backend):
    name = "tvm"

    # absorbed MLA and grouped MoE, as triton runs them (the lowering covers both forms of each)
    pipeline = ("cse", "fold_constants", "absorb_mla", "fuse_router", "group_moe", "fuse_swiglu", "dce")

    def available(self, device: str) -> str | None:
        if prebuilt_root() is not None:  # modules built elsewhere: TVM's runtime is enough
            if importlib.util.find_spec("tvm") is None:
                return f"apache-tvm is not installed; {INSTALL_HINT}"
            return None if prebuilt_root().is_dir() else f"${PREBUILT_ENV}={prebuilt_root()} is not a directory"
        return unavailable_reason(device)

    def compile_graph(self, graph, weights, device, report, passes=None, tune=None, work_dir=None, **options):
        if options:
            raise BackendUnavailable(f"tvm backend: unknown option(s) {sorted(options)}; known: passes, tune, work_dir")
        graph, weights = self.run_passes(graph, weights, passes, report)
        if prebuilt_root() is not None:
            path = prebuilt_root() / graph_key(graph, device)
            if not (path / LIBRARY).exists():
                raise BackendUnavailable(
                    f"no prebuilt TVM module {path.name}: build it where TVM's compiler is, with `dsgraph bench "
                    f"MODEL --device {device} --prebuild DIR` and this run's workloads and dtype, into "
                    f"${PREBUILT_ENV} ({prebuilt_root()})")
            return self._load(path, graph, weights, device, report, f"loaded prebuilt module {path.name}")
        graph, built = build_graph(graph, weights, device, report, tune)
        tmp = None
        if work_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="dsgraph-tvm-")
            work_dir = tmp.name
        save_program(work_dir, built.executable, built.program)
        size = (Path(work_dir) / LIBRARY).stat().st_size
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


register_backend("tvm", TVMBackend)
