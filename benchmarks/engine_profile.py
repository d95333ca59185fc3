"""Where a serving step's time goes: the Engine driven directly (no HTTP), host time against device time.

Adds --requests requests of --input-len random ids asking for --output-len tokens, runs `Engine.step` until all
finish, and splits each step's wall time into the host part (wall minus the time the GPU was busy, measured with
CUDA events around the step) per kind of step (prefill-carrying / decode-only), with the graph calls each kind
makes per step (`Engine.calls`: one paged decode and one packed prefill call at most on triton) and the time per
prompt token. Then profiles --profile-steps decode-only steps and the first --profile-steps prefill-carrying
steps of a fresh batch with cProfile and prints the functions that cost the most host time. Results go to
$OUT/engine_profile.json when OUT is set.

    python benchmarks/engine_profile.py deepseek-v2-lite --device cuda --backend triton --dtype bfloat16 \\
        --requests 64 --input-len 1024 --output-len 64
    python benchmarks/engine_profile.py deepseek-v2-lite-tiny --requests 16 --input-len 32 --output-len 8
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import time

import torch

import dsgraph


def run(engine, prompts, out_len, sync):
    for p in prompts:
        engine.add_request(p, max_tokens=out_len)
    rows = []
    while engine.has_unfinished():
        prefill = any(s.pending() > 1 for s in engine.running) or bool(engine.waiting)
        sync()
        before = [(s.computed, s.pending(), len(s.table)) for s in engine.running]
        calls, computed = sum(engine.calls.values()), _computed(engine)
        t0 = time.perf_counter()
        try:
            engine.step()
            sync()
        except Exception:
            print(f"step {len(rows)} failed; running (computed, pending, blocks) before it: {before}; "
                  f"waiting {len(engine.waiting)}", flush=True)
            raise
        rows.append(("prefill" if prefill else "decode", engine.num_running, time.perf_counter() - t0,
                     sum(engine.calls.values()) - calls, _computed(engine) - computed))
    return rows


def _computed(engine) -> int:
    """Tokens whose cache rows the running requests hold (finished requests leave: count a step's work as the
    difference before and after, which a leaving request makes slightly low)."""
    return sum(s.computed for s in engine.running)


def _profile(engine, steps: int, sync, label: str) -> float:
    """cProfile `steps` engine steps; prints the top host functions; returns ms per step."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        engine.step()
    sync()
    prof.disable()
    per_step = (time.perf_counter() - t0) / steps
    print(f"profiled {label} step: {1e3 * per_step:.2f} ms at B={engine.num_running}")
    for order in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(order).print_stats(35)
        print(s.getvalue())
    return 1e3 * per_step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--backend", default="eager")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--profile-steps", type=int, default=20)
    args = p.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    exe = dsgraph.compile(dsgraph.load(args.model, dtype=args.dtype), backend=args.backend, device=args.device,
                          dtype=args.dtype)
    rng = random.Random(0)
    prompts = [[rng.randrange(exe.vocab_size) for _ in range(args.input_len)] for _ in range(args.requests)]
    engine = dsgraph.Engine(exe, max_num_seqs=args.requests, max_num_batched_tokens=args.max_num_batched_tokens)
    print("decode path:", engine.decode_path, flush=True)
    run(engine, prompts[:2], 4, sync)                                  # warm-up: compiles, captures
    t0 = time.perf_counter()
    rows = run(engine, prompts, args.output_len, sync)
    total = time.perf_counter() - t0
    summary = {}
    for kind in ("prefill", "decode"):
        ts = [t for k, _, t, _, _ in rows if k == kind]
        if ts:
            summary[kind] = {"steps": len(ts), "median_ms": 1e3 * statistics.median(ts), "total_s": sum(ts),
                             "max_graph_calls_per_step": max(c for k, _, _, c, _ in rows if k == kind)}
    if "prefill" in summary:
        summary["prefill"]["us_per_prompt_token"] = 1e6 * summary["prefill"]["total_s"] / (args.requests *
                                                                                          args.input_len)
    full = [t for k, b, t, _, _ in rows if k == "decode" and b == args.requests]
    summary["decode_at_full_batch_median_ms"] = 1e3 * statistics.median(full) if full else None
    summary["total_s"] = total
    summary["tokens_per_s"] = args.requests * args.output_len / total
    print(json.dumps(summary, indent=1), flush=True)

    # profile the first prefill-carrying steps of a fresh batch, then decode-only steps at full batch
    for p_ in prompts:
        engine.add_request(p_, max_tokens=args.output_len + args.profile_steps)
    summary["profiled_prefill_step_ms"] = _profile(engine, args.profile_steps, sync, "prefill-carrying")
    while any(s.pending() > 1 for s in engine.running) or engine.waiting:
        engine.step()
    sync()
    summary["profiled_step_ms"] = _profile(engine, args.profile_steps, sync, "decode")
    while engine.has_unfinished():
        engine.step()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "engine_profile.json"), "w") as f:
            json.dump({**summary, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
