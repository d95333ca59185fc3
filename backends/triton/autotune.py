"""Tile-size autotuning per shape, cached on disk so a shape is timed once per machine.

`pick(kernel, key, candidates, bench)` returns the fastest candidate config (a dict, list or dataclass) for `key`
(a tuple of shape facts, e.g. (E, N, K, M bucket)). Timings use `triton.testing.do_bench` (median); results live in
`$DSGRAPH_CACHE_DIR/triton/tuned/<kernel>.json` (default ~/.cache/dsgraph, tuned.py), keyed by GPU name, Triton
version and key. Under the interpreter nothing is timed: the first candidate, a small tile, is used.
"""
from __future__ import annotations

import dataclasses

import torch
import triton.testing

from dsgraph.progress import track
from dsgraph.version import tool_version

from .runtime import interpreting
from .tuned import read_table, table_path, write_table

_MEMO: dict[tuple, object] = {}  # (kernel, key) -> the chosen candidate, or None: known to be untuned


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _read(kernel: str) -> dict:
    return read_table(table_path(kernel))


def _encode(config):
    """A config as JSON stores it (dataclasses become dicts, tuples lists), to write and to compare with."""
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return list(config) if isinstance(config, tuple) else config


def _write(kernel: str, entry_key: str, config) -> None:
    write_table(table_path(kernel), {entry_key: _encode(config)})


def _entry_key(key: tuple) -> str:
    """The disk cache's key: the GPU's name, the Triton version (another compiler's timings are not this one's)
    and the shape facts (a config tuned on one GPU is not another's)."""
    return f"{_device_name()}|triton {tool_version('triton')}|{'x'.join(str(k) for k in key)}"


def cached(kernel: str, key: tuple, candidates: list):
    """The candidate already chosen for `key` (this process or the disk cache), or None: never times anything.
    A miss is remembered too, so untuned launches (tune=False) do not re-read the disk cache on every call."""
    memo_key = (kernel, key)
    if memo_key not in _MEMO:
        stored = _read(kernel).get(_entry_key(key))
        _MEMO[memo_key] = next((c for c in candidates if stored is not None and _encode(c) == stored), None)
    return _MEMO[memo_key]


def pick(kernel: str, key: tuple, candidates: list, bench, timer=None):
    """The best of `candidates` for `key`; `bench(config)` runs the kernel once with that config. `timer(fn)`
    returns milliseconds (default: triton.testing.do_bench's median). While a CUDA graph is being captured nothing
    is timed: the known winner, else the first candidate (not remembered)."""
    if interpreting() or len(candidates) == 1:
        return candidates[0]
    known = cached(kernel, key, candidates)
    if known is not None:
        return known
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return candidates[0]
    timer = timer or (lambda fn: triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))
    best, best_ms = candidates[0], float("inf")
    for cfg in track(candidates, f"autotuning {kernel} {'x'.join(map(str, key))}", unit="config"):
        try:
            bench(cfg)  # compile (and fail, if it does not fit) before timing
            ms = timer(lambda: bench(cfg))
        except Exception:  # a config that does not fit (shared memory, registers) is just not a candidate
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _write(kernel, _entry_key(key), best)
    _MEMO[(kernel, key)] = best
    return best


def graph_ms(fn, rep: int = 20) -> float:
    """Median milliseconds of `fn` replayed from a CUDA graph, the way a captured decode step runs it: plain
    launches of a few-microsecond kernel measure the host's launch overhead instead of the kernel."""
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def bucket(m: int) -> int:
    """Round a token count up to a power of two so nearby batch sizes share a tuned config."""
    return 1 << max(0, (int(m) - 1).bit_length())
