"""The serving engine's host work per decode step, without the model's: host microseconds per step at B = 1, 16, 64.

On a GPU the batch's decode step runs as one graph replay (11.5 ms at B = 64 for full-size V2-Lite on an H200);
whatever the engine does on the host around it (scheduling, block tables, sampling, stop rules,
detokenisation, reporting) adds to every token's latency. This measures exactly that on a CPU: the tiny preset
on eager, every request detokenised as the server asks, and the paged decode path the triton backend runs on the
GPU, its program replaced by a stand-in that hands back fixed logits at no cost (`--path paged`, the default),
or the eager contiguous path with its graph calls' time taken out (`--path contiguous`). B requests are admitted
and prefilled, then --steps decode steps are timed one by one, the model's time subtracted: the median
(and the minimum, the least disturbed by other processes) of the host time per step.

    python benchmarks/engine_host.py                  # paged, B = 1,16,64
    python benchmarks/engine_host.py --path contiguous --batch 1,16
Writes $OUT/engine_host.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from dsgraph.backends.triton.paged_decode import PagedDecode

import dsgraph
from dsgraph.serve.engine import Engine


class _Timed:
    """A callable that counts the seconds spent in it (the model's share of a step)."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args):
        t = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - t


class StandIn:
    """The paged program's place: logits that vary with the position (so detokenisation sees changing tokens)
    from a fixed random table, nothing computed."""

    def __init__(self, exe):
        self.graph, self.device = exe.graph, exe.device
        self.table = torch.randn(97, 1, exe.vocab_size, generator=torch.Generator().manual_seed(0))

    def __call__(self, inputs: dict) -> dict:
        return {"logits": self.table[inputs["positions"][:, 0] % 97]}


def measure(exe, timed: _Timed, batch: int, input_len: int, output_len: int, steps: int) -> dict:
    eng = Engine(exe, max_num_seqs=batch, max_num_batched_tokens=batch * input_len)
    g = torch.Generator().manual_seed(batch)
    for _ in range(batch):
        eng.add_request(torch.randint(3, exe.vocab_size, (input_len,), generator=g).tolist(), output_len,
                        detokenize=True, stop_token_ids=[])
    eng.step()                                     # every prompt prefilled in one step
    eng.step()
    host, model = [], []
    for _ in range(steps):
        timed.seconds = 0.0
        t0 = time.perf_counter()
        made = sum(len(o.new_token_ids) for o in eng.step())
        host.append((time.perf_counter() - t0 - timed.seconds) * 1e6)
        model.append(timed.seconds * 1e6)
        assert made == batch, f"a decode step made {made} tokens for {batch} requests"
    med = statistics.median(host)
    return {"batch": batch, "host_us_per_step": med, "host_us_per_step_min": min(host),
            "host_us_per_request": med / batch, "model_us_per_step": statistics.median(model),
            "decode_path": eng.decode_path}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deepseek-v2-lite-tiny")
    p.add_argument("--path", default="paged", choices=["paged", "contiguous"])
    p.add_argument("--batch", default="1,16,64")
    p.add_argument("--input-len", type=int, default=384)
    p.add_argument("--output-len", type=int, default=120)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    if args.steps + 2 > args.output_len:
        raise SystemExit(f"--output-len {args.output_len} must exceed --steps + 2 (every timed step decodes)")
    torch.set_num_threads(1)
    exe = dsgraph.compile(dsgraph.load(args.model), backend="eager", device="cpu", dtype=torch.float32)
    if args.path == "paged":
        timed = _Timed(StandIn(exe))
        exe.compiled.paged_decode = PagedDecode(lambda: timed, capture=False)
        timed.graph, timed.device = exe.graph, exe.device
    else:
        timed = exe.compiled.run = _Timed(exe.compiled.run)
    rows = []
    for b in (int(x) for x in args.batch.split(",")):
        rows.append(measure(exe, timed, b, args.input_len, args.output_len, args.steps))
        r = rows[-1]
        print(f"B = {b:3d}: host {r['host_us_per_step']:8.1f} us/step (min {r['host_us_per_step_min']:8.1f}; "
              f"{r['host_us_per_request']:6.1f} us/request), model {r['model_us_per_step']:8.1f} us/step", flush=True)
    print(f"decode path: {rows[-1]['decode_path']}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "engine_host.json"), "w") as f:
            json.dump({"model": args.model, "path": args.path, "input_len": args.input_len, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
