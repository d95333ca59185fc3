"""Kernel launches of one triton decode step, counted on the CPU (Triton's interpreter): no GPU needed.

    TRITON_INTERPRET=1 python benchmarks/count_launches.py deepseek-v2-lite-tiny deepseek-v3-tiny
    TRITON_INTERPRET=1 python benchmarks/count_launches.py deepseek-v3-tiny --no-pass fuse_mla_rows   # before
    TRITON_INTERPRET=1 python benchmarks/count_launches.py deepseek-v2-lite-tiny --fold-shared-experts

A launch is a Triton kernel call, or a torch op that would launch a CUDA kernel (anything but views, metadata and
allocations), counted per step of the lowered program (torch ops inside a Triton call, the interpreter's own
copies, are not counted). The counted step is the second one, whose caches are buffers with room (steady state).
It runs as the plain program does; a CUDA-graph replay launches the same kernels, with `cache.append`'s copy
becoming an index_copy_. Differences from the GPU program, which this cannot
see: `gemv=1` (the GPU default, `--gemv`) runs the dense few-row projections in the GEMV template instead of
cuBLAS (one launch each either way), and `moe.gate` is one launch here but two on a GPU (router logits kernel +
routing kernel). Layers scale the count: the tiny presets have the full model's per-layer structure.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import torch  # noqa: E402
from dsgraph.backends import get_backend  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import dsgraph  # noqa: E402
from dsgraph.app.bench.workloads import random_inputs  # noqa: E402

_FREE = ("_unsafe_view", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
         "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_local_scalar_dense", "set_",
         "resize_")


class _Counter(TorchDispatchMode):
    """Counts torch ops that launch a kernel, charged to the current step; Triton calls count once each."""

    def __init__(self):
        super().__init__()
        self.step, self.inside_triton = None, 0
        self.per_step: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside_triton and self.step is not None and not func.is_view and name not in _FREE:
            self.per_step[self.step] += 1
        return func(*args, **(kwargs or {}))


def _patch_triton(counter: _Counter):
    from triton.runtime.interpreter import InterpretedFunction  # only after TRITON_INTERPRET is set

    plain = InterpretedFunction.run

    def run(self, *args, **kwargs):
        if counter.step is not None and not counter.inside_triton:
            counter.per_step[counter.step] += 1
        counter.inside_triton += 1
        try:
            return plain(self, *args, **kwargs)
        finally:
            counter.inside_triton -= 1
    InterpretedFunction.run = run


def count(preset: str, pipeline, options: dict, context: int) -> tuple[Counter, int]:
    """{step label: launches} of one decode step at batch 1 after `context` cached tokens, and the layer count."""
    model = dsgraph.load(preset)
    exe = dsgraph.compile(model, backend="triton", device="cpu", passes=pipeline, **options)
    program = exe.compiled._run
    inputs = random_inputs(exe.graph, {"B": 1, "S": 1, "T": context}, 0, model.config.vocab_size)
    counter = _Counter()
    _patch_triton(counter)
    plain = program.run_step

    def run_step(step, args, sym):
        counter.step = step.label.split(" -> ")[0]
        try:
            return plain(step, args, sym)
        finally:
            counter.step = None
    program.run_step = run_step
    with torch.no_grad():
        out = program(inputs)   # warm (kernels load, tiles are chosen); its caches are growing buffers with room
        inputs.update({name: out[nxt] for name, nxt in exe.graph.cache_map.items()})
        counter.per_step.clear()
        with counter:
            program(inputs)
    return counter.per_step, model.config.num_hidden_layers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("presets", nargs="+")
    p.add_argument("--context", type=int, default=8)
    p.add_argument("--gemv", action="store_true", help="the GEMV template for few-row projections (GPU default)")
    p.add_argument("--fold-shared-experts", action="store_true")
    p.add_argument("--no-pass", action="append", default=[], help="drop a pass from the triton pipeline")
    a = p.parse_args(argv)
    opts = {"group_moe": {"fold_shared_experts": a.fold_shared_experts}}
    pipeline = [s for s in get_backend("triton").default_pipeline(**opts)
                if (s[0] if isinstance(s, tuple) else s) not in a.no_pass]
    for preset in a.presets:
        per_step, layers = count(preset, pipeline, {"gemv": 1} if a.gemv else {}, a.context)
        total = sum(per_step.values())
        print(f"{preset}: {total} launches per decode step, {layers} layers ({total / layers:.1f} per layer, "
              f"head and embedding included)")
        for label, n in sorted(per_step.items(), key=lambda kv: -kv[1]):
            print(f"  {n:4d}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
