"""Bench output: the terminal table, the JSON document (with a schema check) and the plot.

JSON layout (schema "dsgraph-bench/1"):
  {"schema", "created", "config": {...the command's settings...},
   "environment": {host, cpu, gpu, driver, cuda, versions{...}, git_commit},
   "peaks": {machine, source, bandwidth_gbs, flops_tflops{dtype: TFLOP/s}, measured_at},
   "rows": [ {workload, level, label, shape, batch, context, tokens, backend, status, error, tolerance,
              reason, median_ms, p20_ms, p80_ms, min_ms, repeats, buffers, timing_method, throughput,
              throughput_unit, flops, bytes, floor_ms, bound, frac_of_floor, speedup_vs_eager,
              speedup_vs_torch_compile, compile_s, fallbacks, ttft_ms, notes}, ... ]}
status is ok | WRONG | failed | unavailable; timing fields are null unless status is ok.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

SCHEMA = "dsgraph-bench/1"
STATUSES = ("ok", "WRONG", "failed", "unavailable")
_NUM = (int, float)
ROW_FIELDS = {
    "workload": str, "level": str, "label": str, "shape": dict, "batch": int, "context": int, "tokens": int,
    "backend": str, "status": str, "error": (float, int, type(None)), "tolerance": float,
    "reason": (str, type(None)), "median_ms": (float, type(None)), "p20_ms": (float, type(None)),
    "p80_ms": (float, type(None)), "min_ms": (float, type(None)), "repeats": (int, type(None)),
    "buffers": (int, type(None)), "timing_method": (str, type(None)), "throughput": (float, type(None)),
    "throughput_unit": str, "flops": _NUM, "bytes": _NUM, "floor_ms": _NUM, "bound": str,
    "frac_of_floor": (float, type(None)), "speedup_vs_eager": (float, type(None)),
    "speedup_vs_torch_compile": (float, type(None)), "compile_s": (float, type(None)),
    "fallbacks": (int, type(None)), "ttft_ms": (float, type(None)), "notes": list,
}
TOP_FIELDS = {"schema": str, "created": str, "config": dict, "environment": dict, "peaks": dict, "rows": list}


# ---------------------------------------------------------------- environment
MODULE_OF = {"apache-tvm": "tvm", "onnxruntime-gpu": None}  # None: the module would answer for another package


def _version(dist: str) -> str | None:
    """The installed distribution's version, else the imported module's `__version__` (a package copied onto
    the path without its metadata, e.g. a runtime-only TVM), else None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        module = MODULE_OF.get(dist, dist)
        mod = sys.modules.get(module) if module else None
        return getattr(mod, "__version__", None)


def git_commit(start: Path | None = None) -> str | None:
    """The checked-out commit, read from .git without running git; $DSGRAPH_GIT_COMMIT names it for a copy of
    the tree without .git (a benchmark machine the tree was sent to)."""
    if os.environ.get("DSGRAPH_GIT_COMMIT"):
        return os.environ["DSGRAPH_GIT_COMMIT"]
    p = (start or Path(__file__)).resolve()
    for d in [p, *p.parents]:
        head = d / ".git" / "HEAD"
        if head.is_file():
            ref = head.read_text().strip()
            if not ref.startswith("ref: "):
                return ref
            name = ref[5:]
            loose = d / ".git" / name
            if loose.is_file():
                return loose.read_text().strip()
            packed = d / ".git" / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + name):
                        return line.split()[0]
            return None
    return None


def environment(device: str) -> dict:
    env = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
           "cpu": _cpu_name(), "cpu_cores": os.cpu_count(), "device": device, "gpu": None, "driver": None,
           "cuda": torch.version.cuda, "git_commit": git_commit(),
           "versions": {d: _version(d) for d in ("torch", "triton", "apache-tvm", "onnx", "onnxruntime",
                                                 "onnxruntime-gpu", "dsgraph")}}
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------- JSON
def document(config: dict, env: dict, peaks: dict, rows: list[dict], complete: bool = True) -> dict:
    """`complete` is false in the partial documents written while a run goes on."""
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": config,
            "environment": env, "peaks": peaks, "rows": rows, "complete": complete}


def validate(doc: dict) -> list[str]:
    """Problems with a bench JSON document (empty when it follows the schema)."""
    errs = [f"top-level {k!r} missing or not {t.__name__}" for k, t in TOP_FIELDS.items()
            if not isinstance(doc.get(k), t)]
    if errs:
        return errs
    if doc["schema"] != SCHEMA:
        errs.append(f"schema is {doc['schema']!r}, expected {SCHEMA!r}")
    if not isinstance(doc.get("complete", True), bool):
        errs.append("complete must be true or false")
    for key in ("bandwidth_gbs", "flops_tflops"):
        if key not in doc["peaks"]:
            errs.append(f"peaks.{key} missing")
    for i, row in enumerate(doc["rows"]):
        for k, t in ROW_FIELDS.items():
            if k not in row:
                errs.append(f"rows[{i}].{k} missing")
            elif not isinstance(row[k], t) or (isinstance(row[k], bool) and t is not bool):
                errs.append(f"rows[{i}].{k} = {row[k]!r} has the wrong type")
        if row.get("status") not in STATUSES:
            errs.append(f"rows[{i}].status {row.get('status')!r} not in {STATUSES}")
        timed = row.get("status") == "ok"
        if timed != (row.get("median_ms") is not None):
            errs.append(f"rows[{i}]: median_ms must be set exactly when status is ok")
    return errs


def write_json(path, doc: dict) -> None:
    errs = validate(doc)
    if errs:
        raise ValueError("bench JSON does not follow its schema: " + "; ".join(errs[:5]))
    tmp = Path(f"{path}.{os.getpid()}.tmp")  # replaced whole: a reader never sees half a document
    tmp.write_text(json.dumps(doc, indent=1, default=float))
    os.replace(tmp, path)


# ---------------------------------------------------------------- table
def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """One line per (workload shape, backend), grouped by workload shape."""
    head = (f"{'workload':<34} {'backend':<22} {'status':<8} {'median ms':>10} {'±':>5} {'tokens/s':>11} "
            f"{'floor ms':>9} {'bound':<7} {'%floor':>7} {'x eager':>8} {'x tc':>7}")
    lines, last = [head, "-" * len(head)], None
    for r in rows:
        if last is not None and r["label"] != last:
            lines.append("")
        last = r["label"]
        spread = None if r["median_ms"] is None else (r["p80_ms"] - r["p20_ms"]) / 2 / r["median_ms"] * 100
        line = (f"{r['label']:<34} {r['backend']:<22} {r['status']:<8} {_fmt(r['median_ms'], '10.3f'):>10} "
                f"{_fmt(spread, '4.0f') + '%' if spread is not None else '-':>5} {_fmt(r['throughput'], '11.4g'):>11} "
                f"{r['floor_ms']:>9.4f} {r['bound']:<7} "
                f"{_fmt(None if r['frac_of_floor'] is None else 100 * r['frac_of_floor'], '6.1f'):>7} "
                f"{_fmt(r['speedup_vs_eager'], '7.2f'):>8} {_fmt(r['speedup_vs_torch_compile'], '6.2f'):>7}")
        if r["status"] != "ok":
            detail = r["reason"] or ""
            if r["status"] == "WRONG" and r["error"] is not None:
                detail = f"rel err {r['error']:.2e} > {r['tolerance']:.0e}; not timed"
            line += f"  {detail}"
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------- plot
def plot(rows: list[dict], path, title: str) -> None:
    """Two panels per level: median time (log) and fraction of the roofline floor, grouped by workload."""
    import matplotlib  # optional dependency (the [plot] extra): only plots need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
    levels = [lv for lv in ("op", "model") if any(r["level"] == lv for r in rows)]
    fig, axes = plt.subplots(2, max(len(levels), 1), figsize=(7 * max(len(levels), 1), 8), squeeze=False)
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    width = 0.8 / max(len(backends), 1)
    for col, level in enumerate(levels):
        labels = list(dict.fromkeys(r["label"] for r in rows if r["level"] == level))
        by = {(r["label"], r["backend"]): r for r in rows if r["level"] == level}
        for row_i, (key, ylabel, log) in enumerate((("median_ms", "median time (ms)", True),
                                                    ("frac_of_floor", "fraction of roofline floor", False))):
            ax = axes[row_i][col]
            for j, be in enumerate(backends):
                xs = [i + (j - (len(backends) - 1) / 2) * width for i in range(len(labels))]
                vals = [(by.get((lb, be)) or {}).get(key) or 0.0 for lb in labels]
                ax.bar(xs, vals, width, label=be)
                for x, lb in zip(xs, labels):
                    r = by.get((lb, be))
                    if r and r["status"] != "ok":
                        ax.text(x, 0, "n/a" if r["status"] == "unavailable" else r["status"], rotation=90,
                                ha="center", va="bottom", fontsize=7, color="gray" if r["status"] == "unavailable"
                                else "red", transform=ax.get_xaxis_transform())
            if log and any(r.get(key) for r in by.values()):
                ax.set_yscale("log")
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{level} level")
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
