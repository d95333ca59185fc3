"""What each serving-engine step runs, counted on the CPU (Triton's interpreter): no GPU needed.

    TRITON_INTERPRET=1 python benchmarks/count_engine_calls.py deepseek-v2-lite-tiny --lens 21,13,9,30,17,26

Per `Engine.step`: the graph-program calls and the shape [B, S] of each, the Triton launches, the launches whose
specialisation (kernel, constexprs, dtypes, each int argument's ==1 / %16 class: what Triton compiles a kernel
for) is new in the run, i.e. a compile on a GPU, and the host syncs (`.item()`-like reads) inside the programs.
A step with N prefill chunks should make O(1) calls at few shapes, not one per chunk at a new shape each.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import dsgraph  # noqa: E402
from dsgraph.interpreter import Interpreter  # noqa: E402
from dsgraph.serve.engine import Engine  # noqa: E402


class _Count(TorchDispatchMode):
    """Counts host syncs inside graph programs into `stats`."""

    def __init__(self, stats: Counter):
        super().__init__()
        self.stats = stats

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense" and self.stats["inside"]:
            self.stats["syncs in programs"] += 1
        return func(*args, **(kwargs or {}))


def _patch(stats: Counter) -> None:
    from triton.runtime.interpreter import InterpretedFunction  # only after TRITON_INTERPRET is set

    seen, launch, run = set(), InterpretedFunction.run, Interpreter.run

    def counted_launch(self, *args, **kwargs):
        stats["launches"] += 1
        key = (self.fn.__name__, *(("1" if a == 1 else "16" if a % 16 == 0 else "int") if isinstance(a, int)
                                   else str(a.dtype) if isinstance(a, torch.Tensor) else "" for a in args),
               *sorted((k, str(v)) for k, v in kwargs.items() if k != "grid"))
        if key not in seen:
            seen.add(key)
            stats["new specialisations"] += 1
        return launch(self, *args, **kwargs)

    def counted_run(self, inputs, record=False):
        stats[f"program call {tuple(inputs['input_ids'].shape)}"] += 1
        stats["inside"] += 1
        try:
            return run(self, inputs, record)
        finally:
            stats["inside"] -= 1
    InterpretedFunction.run, Interpreter.run = counted_launch, counted_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset")
    p.add_argument("--lens", default="21,13,9,30,17,26", help="prompt lengths, one request each")
    p.add_argument("--max-tokens", type=int, default=3)
    p.add_argument("--budget", type=int, default=40, help="max_num_batched_tokens")
    p.add_argument("--block-size", type=int, default=4)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    exe = dsgraph.compile(dsgraph.load(a.preset), backend="triton", device="cpu", dtype=torch.float32)
    lens = [int(n) for n in a.lens.split(",")]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, exe.vocab_size, (n,), generator=g).tolist() for n in lens]
    eng = Engine(exe, max_num_seqs=len(prompts), max_num_batched_tokens=a.budget, block_size=a.block_size)
    print("decode path:", eng.decode_path)
    stats: Counter = Counter()
    _patch(stats)
    for prompt in prompts:
        eng.add_request(prompt, a.max_tokens)
    with _Count(stats):
        k = 0
        while eng.has_unfinished():
            chunks = sum(1 for s in eng.running + eng.waiting if s.pending() > 1)
            stats.clear()
            t0 = time.perf_counter()
            eng.step()
            del stats["inside"]
            print(f"step {k} ({chunks} requests with a prompt left, {time.perf_counter() - t0:.1f} s): "
                  + ", ".join(f"{n} {what}" for what, n in sorted(stats.items())))
            k += 1
    print("graph calls by path:", eng.calls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
