"""The roofline floor: the least time a workload could take on this machine,
max(bytes / memory bandwidth, FLOPs / peak FLOP rate).

Peaks are measured once per machine — a large copy for bandwidth, a large matmul per
dtype for FLOP rate — and cached in a JSON file ($DSGRAPH_CACHE_DIR, default
~/.cache/dsgraph/peaks.json) keyed by host, device and torch version. Measured
peaks sit below the datasheet's, so "fraction of floor" says how close a backend
gets to what this machine demonstrably sustains.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from dsgraph.cache import cache_root
from dsgraph.dtypes import to_torch

from .timing import measure


def cache_path() -> Path:
    return cache_root() / "peaks.json"


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def machine_key(device: str) -> str:
    return f"{platform.node()}|{device_name(device)}|torch {torch.__version__}"


def _best_ms(fn, device: str, repeats: int) -> float:
    """Median ms of fn() under the bench's one timing discipline (timing.measure)."""
    return measure(lambda _: fn(), [{}], device, warmup=1, repeats=repeats).median_ms


def measure_peaks(device: str, dtypes: list[str]) -> dict:
    """{"bandwidth_gbs": ..., "flops_tflops": {dtype: ...}} measured now (about a second on a CPU)."""
    cuda = str(device).startswith("cuda")
    n = (1 << 28) if cuda else (1 << 24)                     # 1 GiB / 64 MiB of fp32
    bufs = [torch.empty(n, device=device).normal_(), torch.empty(n, device=device)]
    ms = _best_ms(lambda: bufs[1].copy_(bufs[0]), device, 10 if cuda else 5)
    bandwidth = 2 * n * 4 / (ms * 1e-3) / 1e9
    bufs.clear()
    flops = {}
    for dt in dtypes:
        size = 8192 if cuda else 1024
        if dt == "float8_e4m3fn":
            if not cuda or not hasattr(torch, "_scaled_mm"):
                continue
            a = torch.randn(size, size, device=device).to(torch.float8_e4m3fn)
            b = torch.randn(size, size, device=device).to(torch.float8_e4m3fn).t()
            one = torch.ones((), device=device)
            try:
                ms = _best_ms(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16), device, 10)
            except RuntimeError:
                continue
        else:
            if not cuda and dt != "float32":
                continue   # CPU matmuls in bf16/fp16 are not what the backends run; the fp32 peak is used
            a = torch.randn(size, size, device=device, dtype=to_torch(dt))
            b = torch.randn(size, size, device=device, dtype=to_torch(dt))
            ms = _best_ms(lambda: a @ b, device, 10 if cuda else 3)
        flops[dt] = 2 * size ** 3 / (ms * 1e-3) / 1e12
    return {"bandwidth_gbs": bandwidth, "flops_tflops": flops}


def peaks(device: str, dtypes: list[str], refresh: bool = False) -> dict:
    """Cached peaks for this machine, measuring whatever dtype is missing."""
    path, key = cache_path(), machine_key(device)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = None if refresh else cache.get(key)
    missing = [d for d in dtypes if entry is None or d not in entry.get("tried", [])]
    if entry is None or missing:
        fresh = measure_peaks(device, missing or dtypes)
        entry = entry or {"bandwidth_gbs": fresh["bandwidth_gbs"], "flops_tflops": {}, "tried": [],
                          "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        entry["flops_tflops"].update(fresh["flops_tflops"])
        entry["tried"] = sorted(set(entry["tried"]) | set(missing or dtypes))
        cache[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=1))
        except OSError:
            pass  # an unwritable cache only costs a re-measurement next time
        source = "measured"
    else:
        source = f"cached in {path}"
    return {"machine": key, "source": source, "bandwidth_gbs": entry["bandwidth_gbs"],
            "flops_tflops": dict(entry["flops_tflops"]), "measured_at": entry["measured_at"]}


def floor_ms(flops: float, nbytes: float, peak: dict, dtype: str) -> tuple[float, str]:
    """(floor in ms, "memory" | "compute"): whichever bound is slower."""
    rates = peak["flops_tflops"]
    rate = rates.get(dtype) or rates.get("float32")
    mem = nbytes / (peak["bandwidth_gbs"] * 1e9) * 1e3
    comp = flops / (rate * 1e12) * 1e3 if rate else 0.0
    return (mem, "memory") if mem >= comp else (comp, "compute")
