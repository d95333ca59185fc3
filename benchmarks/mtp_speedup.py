"""MTP speculative decoding: tokens/s against plain greedy decoding as a function of acceptance.

A DeepSeek-V3-shaped model at full width (61 layers, MLA, an MoE layer, the MoE MTP block) with a tiny
vocabulary is made to count: its residual branches are zeroed (every kernel still runs at full size), and its
head maps token t to t + 1, so generation walks the whole vocabulary. The MTP branch predicts the same walk;
its head is corrupted on a chosen fraction of the vocabulary, which sets the acceptance rate. Outputs are
checked equal to plain greedy decoding before anything is timed.

Memory: the 60 dense layers share one set of weight tensors (each layer still streams 1.2 GB per step, as a
V3 MoE layer's per-token weight traffic is about the same), and the MoE layers have 64 routed experts of V3's
shape instead of 256 (a decode token touches 8 either way).

    python benchmarks/mtp_speedup.py --device cuda --backend triton --dtype bf16
    python benchmarks/mtp_speedup.py --device cpu --backend eager --tiny --layers 3 --dense 2   # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import time

import dsgraph.models as models
import torch

import dsgraph
from dsgraph.runtime.speculative import speculate


def build(args):
    overrides = dict(vocab_size=args.vocab, num_hidden_layers=args.layers,
                     first_k_dense_replace=min(args.dense, args.layers - 1), quantization_config=None,
                     **({"n_routed_experts": args.experts} if args.experts else {}))
    return models.build_model("deepseek-v3-tiny" if args.tiny else "deepseek-v3", dtype=args.dtype,
                              weights_device=args.device, overrides=overrides)


def make_counter(model):
    """Zero the residual branches, point the main head at t -> t + 1 and make the MTP branch copy it; returns
    (main head, MTP head tensor)."""
    w, cfg = model.weights, model.config
    mtp = f"model.layers.{cfg.num_hidden_layers}"
    zeros: dict = {}
    for name in list(w):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            t = w[name]
            w.set(name, zeros.setdefault((tuple(t.shape), t.dtype), torch.zeros_like(t)))
    d = cfg.hidden_size
    emb, norm = w["model.embed_tokens.weight"], w["model.norm.weight"]
    w.set("model.embed_tokens.weight", emb)
    w.set("model.norm.weight", norm)
    eh = torch.zeros(d, 2 * d, device=emb.device, dtype=emb.dtype)
    eh[:, :d] = torch.eye(d, device=emb.device, dtype=emb.dtype)
    w.set(f"{mtp}.eh_proj.weight", eh)
    w.set(f"{mtp}.enorm.weight", torch.ones_like(norm))
    w.set(f"{mtp}.embed_tokens.weight", emb)
    w.set(f"{mtp}.shared_head.norm.weight", norm)
    e = emb.float()
    final = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * norm.float()  # hidden of t
    head = torch.roll(final, 1, dims=0).to(emb.dtype)  # row j = hidden of j - 1: argmax is t + 1
    w.set("lm_head.weight", head)
    mtp_head = head.clone()
    w.set(f"{mtp}.shared_head.head.weight", mtp_head)
    return head, mtp_head


def share_dense_layers(model, dense: int):
    """Dense layers 1.. alias layer 0's tensors: the same weight traffic per layer, one layer's memory."""
    w = model.weights
    first = {n[len("model.layers.0."):]: w[n] for n in list(w) if n.startswith("model.layers.0.")}
    for i in range(1, dense):
        for suffix, t in first.items():
            w.set(f"model.layers.{i}.{suffix}", t)


def set_mtp_head(mtp_head, head, wrong_fraction: float, seed: int = 0):
    """Write the MTP head in place with `wrong_fraction` of its rows corrupted (random directions). The backends
    bind a weight already in the graph's dtype and device without copying, so the compiled branch sees it."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(head.shape[0], generator=g)[: int(round(wrong_fraction * head.shape[0]))]
    bad = head.clone()
    noise = torch.randn(len(rows), head.shape[1], generator=g) * head.float().std().item()
    bad[rows.to(head.device)] = noise.to(head)
    mtp_head.copy_(bad)


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def measure(exe, heads, frac: float, args) -> dict:
    """Plain and speculative greedy decoding of the same prompts, checked equal, then timed."""
    set_mtp_head(heads[1], heads[0], frac)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, args.vocab, (1, 16), generator=g) for _ in range(args.prompts)]
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
    if frac == 1.0 and max(acc) > 0.1:
        raise SystemExit("the MTP head was not rebound in place (the backend copied the weight); "
                         "acceptance cannot be controlled")
    n = args.new_tokens * len(prompts)
    return {"wrong_fraction": frac, "acceptance": sum(acc) / len(acc), "plain_tok_s": n / plain_t,
            "spec_tok_s": n / spec_t, "speedup": plain_t / spec_t, "tokens_per_step": n / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke run)")
    ap.add_argument("--layers", type=int, default=61, help="main layers (V3: 61)")
    ap.add_argument("--dense", type=int, default=60, help="leading dense layers, sharing weights (V3: 3)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64, help="routed experts per MoE layer (V3: 256)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--wrong", default="1.0,0.5,0.15,0.0", help="fractions of corrupted MTP head rows")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = build(args)
    heads = make_counter(model)
    share_dense_layers(model, min(args.dense, args.layers - 1))
    exe = dsgraph.compile(model, backend=args.backend, device=args.device, dtype=args.dtype, keep_mtp=True)
    set_mtp_head(heads[1], heads[0], 0.5)  # warm-up over every shape the timed runs meet (compilation, autotuning)
    prompt = torch.randint(0, args.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    exe.generate(prompt, args.new_tokens)
    speculate(exe, prompt, args.new_tokens, args.depth)
    print(f"built, compiled and warmed up in {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    for frac in [float(x) for x in args.wrong.split(",")]:
        row = measure(exe, heads, frac, args)
        results.append(row)
        print(f"acceptance {row['acceptance']:.2f}  plain {row['plain_tok_s']:8.1f} tok/s  "
              f"mtp {row['spec_tok_s']:8.1f} tok/s  speedup {row['speedup']:.2f}x  "
              f"({row['tokens_per_step']:.2f} tokens per main step)", flush=True)
    env = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "backend": args.backend,
           "dtype": args.dtype, "layers": args.layers, "dense_layers": args.dense, "vocab": args.vocab,
           "depth": args.depth, "experts": args.experts, "shared_dense_weights": True, "torch": torch.__version__}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "mtp_speedup.json"), "w") as f:
            json.dump({"env": env, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
