"""Graph -> built TVM module + calling convention + report entries (needs TVM's compiler library).

    graph, built = build_graph(graph, weights, "cpu", report)   # legalize, translate, schedule, build
    save_program(directory, built.executable, built.program)

Building does not touch weight values: a module for `cuda` can be built on a machine without a GPU and run
elsewhere with TVM's runtime alone (backends/tvm/runtime.py); `export_module` does exactly that.
"""
from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsgraph.passes import get as get_pass
from dsgraph.passes import run_pipeline

from dsgraph.errors import BackendUnavailable
from dsgraph.ops.registry import get_op
from dsgraph.progress import MIN_NODES, bar

from ..base import CompileReport, KernelChoice
from .build import build, make_target
from .env import unavailable_reason
from .lower import TABLE
from .runtime import LIBRARY, REPORT, save_program
from .translate import translate


@dataclass
class Built:
    executable: object
    program: dict
    kernels: list[KernelChoice]
    notes: list[str] = field(default_factory=list)


def build_graph(graph, weights, device: str, report: CompileReport, tune: dict | None = None):
    """Legalize what TVM has no lowering for, then translate and build for `device`; the kernels and notes go
    into `report`. Returns (the legalized graph, Built)."""
    graph, origins = legalize(graph, weights, report)
    built = compile_program(graph, device, tune, origins)
    report.kernels.extend(built.kernels)
    report.notes.extend(built.notes)
    return graph, built


def legalize(graph, weights, report):
    """Domain ops without a TVM lowering go through their decomposition (the `legalize` pass), reported as
    fallbacks; returns (graph, {origin output name: op}). Ops nothing can lower are left for the translator
    to name in an UnknownOpError."""
    todo = [n for n in graph.nodes if n.op not in TABLE.ops() and get_op(n.op).level == "domain"
            and get_op(n.op).decompose_fn is not None]
    if not todo:
        return graph, {}
    origins = {n.outputs[0].name: n.op for n in todo}
    graph, _, records = run_pipeline(graph, weights, [get_pass("legalize", keep=TABLE.ops())])
    report.passes.extend((r.name, r.summary()) for r in records)
    report.notes.append(f"legalized without a TVM kernel: {', '.join(sorted(set(origins.values())))}")
    return graph, origins


def export_module(graph, device: str, directory, tune: dict | None = None) -> dict:
    """Build `graph` for `device` ("cpu" or "cuda" = sm_90) and write module.so + program.json to `directory`,
    without weights or a GPU; returns the report as JSON. Load it with `load_compiled` where it runs."""
    reason = unavailable_reason(device)
    if reason:
        raise BackendUnavailable(f"backend 'tvm' cannot build for {device}: {reason}")
    report = CompileReport("tvm", device, "n/a")
    _, built = build_graph(graph, None, device, report, tune)
    save_program(directory, built.executable, built.program)
    report.notes.append(f"module.so {(Path(directory) / LIBRARY).stat().st_size / 1024:.0f} KiB")
    (Path(directory) / REPORT).write_text(json.dumps(report.to_json()))
    return report.to_json()


def compile_program(graph, device: str, tune: dict | None = None, fallback_origins: dict | None = None) -> Built:
    """Translate and build `graph` for `device`; `fallback_origins` maps the output names of legalized nodes
    to the op they replaced (their kernels are reported as `fallback`)."""
    target = make_target(device, tuning=bool(tune and tune.get("trials", 0) > 0))
    stages = bar(2, f"tvm build of {graph.name}", unit="step", long=len(graph.nodes) >= MIN_NODES)
    stages.set_postfix_str("translate")
    t0 = time.perf_counter()
    tr = translate(graph, target)
    t1 = time.perf_counter()
    stages.update(1)
    stages.set_postfix_str("schedule, codegen" + (" and MetaSchedule tuning" if tune and tune.get("trials") else ""))
    tune_note = None
    if tune is not None:
        unknown = set(tune) - {"work_dir", "trials"}
        if unknown or "work_dir" not in tune:
            raise BackendUnavailable(f"tvm option tune={tune!r}: give {{'work_dir': DIR, 'trials': N}}")
        if tune.get("trials", 0) > 0 and importlib.util.find_spec("psutil") is None:
            raise BackendUnavailable("MetaSchedule tuning needs psutil (TVM's search uses it): pip install psutil; "
                                     "or tune={'work_dir': DIR, 'trials': 0} to apply existing records only")
        Path(tune["work_dir"]).mkdir(parents=True, exist_ok=True)
        tune_note = (f"MetaSchedule: {tune.get('trials', 0)} tuning trials, records in {tune['work_dir']} "
                     "(existing records reused)")
    executable, schedules = build(tr.mod, target, tune)
    t2 = time.perf_counter()
    stages.update(1)
    stages.close()
    origins = fallback_origins or {}
    kernels = []
    for node, res in tr.kernels:
        origin = origins.get(node.meta.get("origin"))
        kind, note = ("fallback", f"legalized {origin} via its decomposition" + (f"; {res.note}" if res.note else "")) \
            if origin else (res.kind, res.note)
        kernels.append(KernelChoice(tuple(v.name for v in node.outputs), node.op, kind, res.kernel, note))
    target_name = f"{target.kind.name}" + (f" {target.attrs['arch']}" if "arch" in target.attrs else "")
    program = {"inputs": tr.input_names, "params": tr.param_names, "outputs": tr.output_names,
               "derived": [d.__dict__ for d in tr.derived], "device": "cuda" if str(device).startswith("cuda")
               else "cpu", "target": target_name}
    n_tir = sum(1 for _, f in tr.mod.functions_items() if type(f).__name__ == "PrimFunc")
    notes = [f"target {target_name}", f"translate {t1 - t0:.2f}s, build {t2 - t1:.2f}s "
             f"({n_tir} TE/TIR functions before fusion)",
             "schedules: " + ("dlight rules per function (gpu)" if "gpu" in target.keys else "default llvm lowering"),
             *schedules.notes()]
    if tune_note:
        notes.append(tune_note)
    for d in tr.derived:
        more = ", …" if len(d.sources) > 2 else ""
        notes.append(f"derived parameter {d.name} = {d.recipe}({', '.join(d.sources[:2])}{more})")
    return Built(executable, program, kernels, notes)
