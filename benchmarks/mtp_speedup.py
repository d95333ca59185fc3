"""MTP speculative decoding: tokens/s against plain greedy decoding as a function of acceptance.

A V3-shaped model at full width with a tiny vocabulary (and few layers, so it fits one GPU) is made
a "bigram" model: its residual branches are zeroed (all the work is still done), so its next token
is a function of the current one; the MTP branch is routed to the same function, and its head is
corrupted on a chosen fraction of the vocabulary to set how often drafts agree. Outputs are checked
equal to plain greedy decoding before anything is timed.

    python benchmarks/mtp_speedup.py --device cuda --backend triton --dtype bf16
    python benchmarks/mtp_speedup.py --device cpu --tiny      # a smoke run on the CPU
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import dsgraph
import models
from backends.speculative import speculate


def build(tiny: bool, layers: int, dense: int, vocab: int, dtype: str, device: str):
    cfg = models.preset_config("deepseek-v3-tiny" if tiny else "deepseek-v3")
    cfg.update(vocab_size=vocab, num_hidden_layers=layers, first_k_dense_replace=min(dense, layers - 1),
               quantization_config=None)
    conf = models.from_hf(cfg)
    graph = models.build_graph(conf, dtype, mtp=True, name="v3_wide_small_vocab")
    return models.Model("v3-wide", conf, graph, models.random_weights(graph, seed=0, device=device))


def make_bigram(model, wrong_fraction: float, seed: int = 0):
    w, cfg = model.weights, model.config
    L = cfg.num_hidden_layers
    mtp = f"model.layers.{L}"
    for name in list(w):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w.set(name, lambda n=name, f=w.entry(name): torch.zeros_like(f() if callable(f) else f))
    d = cfg.hidden_size
    dev = w["model.norm.weight"].device
    dt = w["model.norm.weight"].dtype

    def eh():
        m = torch.zeros(d, 2 * d, device=dev, dtype=dt)
        m[:, :d] = torch.eye(d, device=dev, dtype=dt)
        return m
    w.set(f"{mtp}.eh_proj.weight", eh)
    w.set(f"{mtp}.enorm.weight", lambda: torch.ones(d, device=dev, dtype=dt))
    w.set(f"{mtp}.embed_tokens.weight", w.entry("model.embed_tokens.weight"))
    w.set(f"{mtp}.shared_head.norm.weight", w.entry("model.norm.weight"))
    head = w["lm_head.weight"]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(head.shape[0], generator=g)[: int(round(wrong_fraction * head.shape[0]))].to(dev)
    bad = head.clone()
    bad[rows] = torch.roll(head, 1, dims=0)[rows]
    w.set(f"{mtp}.shared_head.head.weight", bad)


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def measure(frac: float, args) -> dict:
    """Plain and speculative greedy decoding of the same prompts, checked equal, then timed."""
    model = build(args.tiny, args.layers, args.dense, args.vocab, args.dtype, args.device)
    make_bigram(model, frac)
    exe = dsgraph.compile(model, backend=args.backend, device=args.device, dtype=args.dtype, keep_mtp=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, args.vocab, (1, 16), generator=g) for _ in range(args.prompts)]
    exe.generate(prompts[0], 4)                                   # warm-up (compilation, autotuning)
    speculate(exe, prompts[0], 4, args.depth)
    plain_t = spec_t = 0.0
    acc, steps = [], 0
    for p in prompts:
        ref, t = timed(lambda: exe.generate(p, args.new_tokens), args.device)
        plain_t += t
        (out, _, stats), t = timed(lambda: speculate(exe, p, args.new_tokens, args.depth), args.device)
        spec_t += t
        if not torch.equal(out.cpu(), ref.cpu()):
            raise SystemExit(f"speculative output differs from plain greedy at wrong={frac}")
        acc.append(stats.extra["acceptance_per_position"][0])
        steps += stats.target_steps
    n = args.new_tokens * len(prompts)
    return {"wrong_fraction": frac, "acceptance": sum(acc) / len(acc), "plain_tok_s": n / plain_t,
            "spec_tok_s": n / spec_t, "speedup": plain_t / spec_t, "tokens_per_step": n / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke run)")
    ap.add_argument("--layers", type=int, default=10, help="main layers")
    ap.add_argument("--dense", type=int, default=9, help="leading dense layers (V3: 3; more fit one GPU)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--wrong", default="1.0,0.5,0.3,0.15,0.0", help="fractions of corrupted MTP head rows")
    args = ap.parse_args()
    results = []
    for frac in [float(x) for x in args.wrong.split(",")]:
        row = measure(frac, args)
        results.append(row)
        print(f"acceptance {row['acceptance']:.2f}  plain {row['plain_tok_s']:8.1f} tok/s  "
              f"mtp {row['spec_tok_s']:8.1f} tok/s  speedup {row['speedup']:.2f}x  "
              f"({row['tokens_per_step']:.2f} tokens per main step)", flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    env = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "backend": args.backend,
           "dtype": args.dtype, "layers": args.layers, "dense_layers": args.dense, "vocab": args.vocab,
           "depth": args.depth, "torch": torch.__version__}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "mtp_speedup.json"), "w") as f:
            json.dump({"env": env, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
