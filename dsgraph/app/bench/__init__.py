"""`dsgraph bench`: compare backends side by side on op-level and model-level workloads.

    doc = dsgraph.app.bench.bench("deepseek-v3-tiny", device="cpu", backends=["eager", "onnx"])
    print(dsgraph.app.bench.report.table(doc["rows"]))

Modules: workloads (what is measured), timing (how), roofline (the floor each row is
compared with), runner (the check-then-time loop), report (table, JSON, plot).
Defaults keep CPU runs short; see BENCHMARKS.md for the GPU record commands.
"""
from __future__ import annotations

import time

import dsgraph.models as models
from dsgraph import progress
from dsgraph.backends import get_backend
from dsgraph.backends.tvm.prebuilt import export_prebuilt
from dsgraph.dtypes import compute_dtype
from dsgraph.errors import InputError
from dsgraph.partition import split_graph

from .. import api
from ..api import compile_graph, resolve_device
from . import report, roofline
from .runner import BenchConfig, op_shapes, run_bench
from .workloads import ALL_WORKLOADS, DEFAULT_WORKLOADS, MODEL_WORKLOADS, OP_WORKLOADS, applicable, build_op

DEFAULTS = {
    "cpu": {"batches": [1, 4], "prefill_batches": [1], "contexts": [64], "repeats": 5, "warmup": 2,
            "dtype": "float32", "budget_s": 3.0},
    "cuda": {"batches": [1, 64], "prefill_batches": [1], "contexts": [4096], "repeats": 50, "warmup": 10,
             "dtype": "bfloat16", "budget_s": None},
}


def load_model(name: str, dtype: str, seed: int = 0, device: str = "cpu", mtp: bool = False):
    """The model, without its MTP branch unless `mtp` (plain prefill and decode do not need it); a preset's
    random weights are drawn on `device`, so a full-size model never passes through host memory."""

    if name in models.PRESETS:
        return models.build_model(name, seed=seed, dtype=dtype, mtp=mtp,
                                  weights_device="cuda" if str(device).startswith("cuda") else "cpu")
    model = api.load(name, dtype=dtype, seed=seed)
    if "mtp_ids" in model.graph.inputs and not mtp:
        model = models.Model(model.name, model.config,
                             models.build_graph(model.config, dtype, mtp=False, name=model.graph.name), model.weights)
    return model


def bench(model: str, device: str = "cpu", backends=None, workloads=None, batches=None, prefill_batches=None,
          contexts=None, dtype=None, repeats=None, warmup=None, seed: int = 0, log=None, partial_json=None) -> dict:
    """Run the bench; returns the JSON document (see report.py for its layout). With `partial_json`, the
    document so far is rewritten there after every row (`"complete": false`), so a run that is stopped or
    crashes keeps the rows it made."""
    cfg = _config(model, device, backends, workloads, batches, prefill_batches, contexts, dtype, repeats, warmup,
                  seed)
    mdl = load_model(model, cfg.dtype, seed, cfg.device)
    _check_context(cfg, mdl)
    env = report.environment(cfg.device)
    wanted = [cfg.dtype, "float32"] + (["float8_e4m3fn"] if "fp8_gemm" in cfg.workloads else [])
    peak = roofline.peaks(cfg.device, list(dict.fromkeys(wanted)))
    config = dict(cfg.__dict__)
    on_row = None
    if partial_json:
        def on_row(rows):
            report.write_json(partial_json, report.document(config, env, peak, rows, complete=False))
    rows = run_bench(cfg, mdl, peak, log, lambda: load_model(model, cfg.dtype, seed, cfg.device, mtp=True), on_row)
    return report.document(config, env, peak, rows)


def _config(model, device, backends, workloads, batches, prefill_batches, contexts, dtype, repeats, warmup, seed,
            here: bool = True):
    """The run's configuration; `here` False: `device` is where modules will run, not this machine."""
    for name, value, least in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise InputError(f"--{name} must be an integer >= {least}, got {value!r}")

    if here or device not in ("cpu", "cuda"):
        device = resolve_device(device)
    d = DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    workloads = list(workloads or DEFAULT_WORKLOADS)
    unknown = [w for w in workloads if w not in ALL_WORKLOADS]
    if unknown:
        raise InputError(f"unknown workload(s) {unknown}; choose from {', '.join(ALL_WORKLOADS)}")
    cfg = BenchConfig(model, device, compute_dtype(dtype or d["dtype"]),
                      list(backends or ["eager", "torch_compile", "triton", "tvm", "onnx"]), workloads,
                      list(batches or d["batches"]), list(prefill_batches or d["prefill_batches"]),
                      list(contexts or d["contexts"]), int(repeats or d["repeats"]), max(1, int(warmup or d["warmup"])),
                      seed, d["budget_s"])
    for name, values in (("batch", cfg.batches), ("prefill batch", cfg.prefill_batches), ("context", cfg.contexts)):
        if not values or any(v < 1 for v in values):
            raise InputError(f"--{name.replace(' ', '-')} needs positive integers, got {values}")
    return cfg


def _check_context(cfg, mdl) -> None:
    limit = mdl.config.max_position_embeddings
    if max(cfg.contexts) + 1 > limit:
        raise InputError(f"--context {max(cfg.contexts)} exceeds {cfg.model}'s max_position_embeddings={limit}")


def prebuild_tvm(model: str, directory, device: str = "cuda", workloads=None, batches=None, prefill_batches=None,
                 contexts=None, dtype=None, seed: int = 0, log=progress.write) -> list[str]:
    """Build here, for `device`, every TVM module that `bench` with the same arguments compiles, into
    `directory` (see backends/tvm/prebuilt.py); no GPU and no weights are needed. Returns the module names."""

    cfg = _config(model, device, ["tvm"], workloads, batches, prefill_batches, contexts, dtype, None, None, seed,
                  here=False)
    mdl = load_model(model, cfg.dtype, seed, "cpu")   # lazy weights: passes derive, nothing is drawn
    _check_context(cfg, mdl)
    be = get_backend("tvm")
    graphs = []
    for name in cfg.workloads:
        if name in OP_WORKLOADS and not applicable(name, mdl.config):
            for env in op_shapes(cfg, name):
                w = build_op(name, mdl.config, cfg.dtype, env, seed)
                graphs.append(compile_graph(w.graph, w.weights, be, "default", True, None)[0])
    if any(n in MODEL_WORKLOADS for n in cfg.workloads):
        graphs.append(compile_graph(mdl.graph, mdl.weights, be, "default", False, None)[0])
    if "speculative" in cfg.workloads and not applicable("speculative", mdl.config):
        full = load_model(model, cfg.dtype, seed, "cpu", mtp=True)
        graphs.extend(split_graph(compile_graph(full.graph, full.weights, be, "default", True, None)[0], {"mtp_ids"}))
    names = []
    for i, graph in enumerate(progress.track(graphs, "building tvm modules", unit="module")):
        t0 = time.perf_counter()
        path, built = export_prebuilt(graph, cfg.device, directory)
        if path.name not in names:
            names.append(path.name)
        log(f"[{i + 1}/{len(graphs)}] {path.name}: " + (f"built in {time.perf_counter() - t0:.1f} s" if built
                                                         else "already there"))
    return names
