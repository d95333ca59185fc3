"""Serving throughput and latency: the OpenAI client against `dsgraph serve` at several concurrencies.

Starts the server in this process (or drives one at --url), sends --prompts requests (one count, or one per
concurrency) of --input-len random token ids each asking for exactly --output-len tokens (ignore_eos), streamed,
at each concurrency, and reports request throughput, output tokens/s, and TTFT / TPOT percentiles. Before each
level, `concurrency` short requests warm the server up (kernel compiles, autotuning, CUDA-graph captures of the
batch buckets), untimed. The timed clients run in --client-procs processes of their own (the concurrency split
among them): in the server's process the OpenAI client's parsing of every streamed chunk took the GIL from the
engine thread (at concurrency 64 it used most of a core). Writes $OUT/serve.json when OUT is set.

    python benchmarks/serve.py deepseek-v2-lite --device cuda --backend triton --dtype bfloat16 \\
        --concurrency 1,16,64 --prompts 4,64,128 --input-len 1024 --output-len 256
    python benchmarks/serve.py deepseek-v2-lite-tiny --concurrency 1,4 --prompts 8 --input-len 16 --output-len 4
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import socket
import threading
import time

import openai
import torch
import uvicorn
from tokenizers import Tokenizer as Backend
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

import dsgraph
from dsgraph.serve.http import create_app
from dsgraph.text import Tokenizer


def vocabulary_tokenizer(vocab: int) -> Tokenizer:
    """A full-size preset with random weights ships no tokenizer, and the server must detokenise what it emits: a
    word-level tokenizer over the whole vocabulary (id n is the word "tn") does, at no cost to the timing."""
    words = Backend(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    words.pre_tokenizer = WhitespaceSplit()
    return Tokenizer(words)


def start_server(args):
    """create_app on uvicorn in a daemon thread on a free port; the server's URL and its engine."""
    exe = dsgraph.compile(dsgraph.load(args.model, dtype=args.dtype), backend=args.backend, device=args.device,
                          dtype=args.dtype)
    if exe.tokenizer is None:
        exe.tokenizer = vocabulary_tokenizer(exe.vocab_size)
    engine = dsgraph.Engine(exe, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, args.model, max_waiting=1 << 20), host="127.0.0.1",
                                           port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", engine


async def one(client, model, prompt, out_len, gate):
    """One streamed request: (time to first token, time per output token after it, output tokens)."""
    async with gate:
        t0 = time.perf_counter()
        first, n = None, 0
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=out_len, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
            elif first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter()
        end = time.perf_counter()
        first = first or end
        return first - t0, (end - first) / max(n - 1, 1), n


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1e3


async def requests(url, args, concurrency, prompts):
    """Every prompt streamed, `concurrency` at a time: [(ttft, tpot, tokens)]."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=args.api_key or "none", max_retries=0)
    gate = asyncio.Semaphore(concurrency)
    return await asyncio.gather(*(one(client, args.model, p, args.output_len, gate) for p in prompts))


def client_process(url, args, concurrency, prompts, go, results):
    """One client process: waits for `go` (every process started and imported), then runs its share."""
    go.wait()
    t0 = time.monotonic()
    res = asyncio.run(requests(url, args, concurrency, prompts))
    results.put((t0, time.monotonic(), res))


def run_level(url, args, concurrency, prompts):
    """The level's requests from min(--client-procs, concurrency) processes, their results pooled (0: from this
    process, beside the server)."""
    if args.client_procs == 0:
        t0 = time.monotonic()
        res = asyncio.run(requests(url, args, concurrency, prompts))
        return summary(res, time.monotonic() - t0, concurrency)
    procs = max(1, min(args.client_procs, concurrency, len(prompts)))
    ctx = mp.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=client_process, daemon=True,
                           args=(url, args, concurrency // procs + (i < concurrency % procs), prompts[i::procs], go,
                                 results)) for i in range(procs)]
    for w in workers:
        w.start()
    go.set()
    parts = [results.get() for _ in workers]
    for w in workers:
        w.join()
    wall = max(p[1] for p in parts) - min(p[0] for p in parts)
    return summary([r for p in parts for r in p[2]], wall, concurrency)


def summary(res, wall, concurrency):
    ttft, tpot, toks = zip(*res)
    return {"concurrency": concurrency, "requests": len(res), "wall_s": wall, "req_per_s": len(res) / wall,
            "output_tok_per_s": sum(toks) / wall, "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99), "output_tokens": sum(toks)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--url", default=None, help="a running server (default: start one here)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--backend", default="eager")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--prompts", default="64", help="requests per level: one count, or one per concurrency")
    p.add_argument("--warmup-len", type=int, default=4, help="output tokens of each warm-up request (0: none)")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--client-procs", type=int, default=4, help="processes the timed clients run in (0: the server's)")
    args = p.parse_args()
    url, engine = (args.url, None) if args.url else start_server(args)
    if engine is not None:
        print(f"decode path: {engine.decode_path}", flush=True)
    levels = [int(x) for x in args.concurrency.split(",")]
    counts = [int(x) for x in args.prompts.split(",")]
    counts = counts * len(levels) if len(counts) == 1 else counts
    if len(counts) != len(levels):
        raise SystemExit(f"--prompts has {len(counts)} counts for {len(levels)} concurrency levels")
    rng = random.Random(0)
    rows = []
    for c, n in zip(levels, counts):
        warm, prompts = [[[rng.randrange(3, 200) for _ in range(args.input_len)] for _ in range(k)] for k in (c, n)]
        if args.warmup_len:   # prompts of their own: the measured ones must not hit the prefix cache
            asyncio.run(requests(url, argparse.Namespace(**{**vars(args), "output_len": args.warmup_len}), c, warm))
        rows.append(run_level(url, args, c, prompts))
        r = rows[-1]
        print(f"concurrency {c:>3}: {r['req_per_s']:.2f} req/s, {r['output_tok_per_s']:.1f} output tok/s, "
              f"TTFT p50 {r['ttft_p50_ms']:.1f} ms p99 {r['ttft_p99_ms']:.1f} ms, "
              f"TPOT p50 {r['tpot_p50_ms']:.2f} ms p99 {r['tpot_p99_ms']:.2f} ms ({n} requests)", flush=True)
        assert r["output_tokens"] == n * args.output_len, "a request was lost or cut short"
    stats = {} if engine is None else {"decode_path": engine.decode_path, "calls": engine.calls,
                                       "paged_decode": dict(engine.paged.stats) if engine.paged else None}
    if stats:
        print(f"engine: {stats}", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "serve.json"), "w") as f:
            json.dump({"model": args.model, "backend": args.backend, "device": args.device, "input_len": args.input_len,
                       "client_procs": args.client_procs,
                       "output_len": args.output_len, "engine": stats, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
