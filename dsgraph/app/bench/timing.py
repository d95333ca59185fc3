"""Timing with one discipline on every device: warm-up, many repeats, median and spread,
inputs rotated through several buffers so caches do not flatter small workloads.

CUDA uses `triton.testing.do_bench` (CUDA events, L2 flushed between calls) when Triton
is importable, else CUDA events directly; the CPU uses wall time (perf_counter).
Triton is imported only for CUDA timing: on the CPU its interpreter mode must be
chosen before the first import (see backends/triton/runtime.py).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

ROTATE_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
MAX_BUFFERS = 8


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    repeats: int
    method: str

    @property
    def spread(self) -> float:
        """Half the 20-80 percentile range, relative to the median."""
        return (self.p80_ms - self.p20_ms) / 2 / self.median_ms if self.median_ms else 0.0


def buffer_count(one_set_bytes: int, device: str) -> int:
    """How many input sets to rotate through so their total exceeds the last-level cache (capped)."""
    budget = ROTATE_BYTES["cuda" if str(device).startswith("cuda") else "cpu"]
    return max(1, min(MAX_BUFFERS, math.ceil(budget / max(one_set_bytes, 1))))


def _quantiles(ms: list[float]) -> tuple[float, float, float]:
    if len(ms) == 1:
        return ms[0], ms[0], ms[0]
    q = statistics.quantiles(ms, n=10, method="inclusive")
    return statistics.median(ms), q[1], q[7]


def measure(fn: Callable[[dict], object], buffers: list[dict], device: str, warmup: int, repeats: int,
            budget_s: float | None = None) -> Timing:
    """Time fn(inputs) cycling through `buffers`; returns median and 20/80 percentiles in ms.

    On the CPU, `budget_s` caps the timed repeats of slow workloads (at least 3), so an
    interpreted backend does not stretch a run to hours; the row records the repeats made.
    """
    calls = iter(range(1 << 62))

    def step():
        return fn(buffers[next(calls) % len(buffers)])

    if str(device).startswith("cuda"):
        return _measure_cuda(step, warmup, repeats)
    t0 = time.perf_counter()
    step()
    probe = time.perf_counter() - t0
    for _ in range(warmup - 1 if probe < (budget_s or float("inf")) / 4 else 0):
        step()
    if budget_s:
        repeats = max(3, min(repeats, int(budget_s / max(probe, 1e-9))))
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        ms.append((time.perf_counter() - t0) * 1e3)
    med, p20, p80 = _quantiles(ms)
    return Timing(med, p20, p80, min(ms), repeats, "wall clock (perf_counter)")


def _measure_cuda(step, warmup: int, repeats: int) -> Timing:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    try:
        from triton.testing import do_bench  # triton loads only once the bench knows it runs on a GPU
    except ImportError:
        do_bench = None
    if do_bench is not None:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        est = max((time.perf_counter() - t0) * 1e3, 1e-3)
        ms = do_bench(step, warmup=max(1, int(est * warmup)), rep=max(1, int(est * repeats)), return_mode="all")
        method = "triton.testing.do_bench (CUDA events, L2 flushed)"
    else:
        ms = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            ms.append(start.elapsed_time(end))
        method = "CUDA events"
    ms = [float(m) for m in ms]
    med, p20, p80 = _quantiles(ms)
    return Timing(med, p20, p80, min(ms), len(ms), method)
