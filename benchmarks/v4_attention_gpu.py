"""DeepSeek-V4's attention kernels on a GPU at V4-Flash's decode shapes (64 query heads, one shared 512-wide K = V
latent head, window 128, CSA: ratio 4 and top-512 / HCA: ratio 128, a T = 8192 context): the window + compressed +
sink attention (`attention.sink`), the compressor's pooling (`v4.compress`) and the slot-masked top-k, each checked
against its op reference on the first two requests, then timed with CUDA events over CUDA-graph replays.

    python benchmarks/v4_attention_gpu.py                  # B = 1 and 64, bf16; JSON to $OUT if set
    python benchmarks/v4_attention_gpu.py --sweep          # the attention rows at several BLOCK_H / split counts
    python benchmarks/v4_attention_gpu.py --tiny --device cpu   # toy sizes on Triton's interpreter (no timings)

Floor: the bytes the kernel must read and write over 4.2 TB/s (the H200's achievable HBM bandwidth). Attention
reads q, the 128 window rows, the compact compressed entries it attends (the K selected for CSA, all T/128 for
HCA), the indices, and writes the output. The top-k reads the T/4 indexer scores of the compact CSA entries.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from dsgraph.backends.triton.kernels.topk import topk
from dsgraph.backends.triton.kernels.v4_attention import compress, sink_attention

from dsgraph.ops import get_op

BANDWIDTH = 4.2e12   # bytes/s
# --sweep: (heads a program, split-KV partitions); None = sink_launch's default
LAUNCHES = [(None, None), (64, 1), (32, 1), (16, 1), (64, 2), (64, 4), (64, 8), (64, 16), (32, 2), (32, 4), (16, 4)]


def timed_us(fn, device: str, calls: int = 20, replays: int = 10) -> float:
    """Mean µs a call: CUDA events around replays of a graph of `calls` calls (no host launch cost in it)."""
    if device == "cpu":
        return float("nan")   # the interpreter's time says nothing about the kernel
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def rel_err(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def attention_rows(b, h, d, t, window, shapes, dtype, device, gen, sweep: bool) -> list[dict]:
    """Decode (S = 1) at position t - 1: sliding only, CSA (window + top-k) and HCA (window + every group end)."""
    el = torch.empty((), dtype=dtype).element_size()
    q = torch.randn(b, 1, h, d, generator=gen).to(device, dtype)
    kv = torch.randn(b, window, d, generator=gen).to(device, dtype)        # state (window - 1) + the new row
    sinks = torch.randn(h, generator=gen).to(device)
    pos = torch.full((b, 1), t - 1, dtype=torch.int64, device=device)
    rows = []
    for kind, ratio, k in shapes:
        extra, read = {}, 0
        comp = torch.randn(b, t // max(ratio, 1), d, generator=gen).to(device, dtype)   # compact entries
        if kind == "csa":   # k distinct entries, as the slot-masked top-k picks them
            picked = torch.stack([torch.randperm(t // ratio, generator=gen)[:k] for _ in range(b)])
            extra = {"comp": comp, "indices": picked[:, None].to(device)}
            read = k * d * el + k * 8
        elif kind == "hca":
            extra = {"comp": comp}
            read = t // ratio * d * el
        attrs = {"window": window, "ratio": ratio, "scale": d ** -0.5}
        nbytes = b * (2 * h * d * el + window * d * el + read)
        want = get_op("attention.sink").reference_fn(q[:2], kv[:2], sinks, pos[:2],
                                                     *[v[:2] for v in extra.values()], **attrs)
        for block_h, splits in (LAUNCHES if sweep else [(None, None)]):
            run = lambda: sink_attention(q, kv, sinks, pos, window, attrs["scale"], ratio=ratio,  # noqa: E731
                                         num_splits=splits, block_h=block_h, **extra)
            row = {"kernel": f"sink_attention_{kind}", "batch": b, "T": t, "topk": k,
                   "launch": f"{block_h or 'auto'}/{splits or 'auto'}"}
            try:
                err, us = rel_err(run()[:2], want), timed_us(run, device)
            except Exception as e:  # noqa: BLE001  (a row that fails says why; the others still run)
                rows.append({**row, "error": f"{type(e).__name__}: {e}"})
                continue
            rows.append({**row, "rel_err": err, "us": us, "floor_us": nbytes / BANDWIDTH * 1e6})
    return rows


def compress_rows(b, d, t, shapes, dtype, device, gen) -> list[dict]:
    """One decode token at a group end (the step that pools), CSA (overlap, width 2d) and HCA (width d)."""
    el = torch.empty((), dtype=dtype).element_size()
    rows = []
    for kind, ratio in shapes:
        overlap = kind == "csa"
        c = 2 * d if overlap else d
        r = (2 if overlap else 1) * ratio - 1
        args = (torch.randn(b, 1, c, generator=gen).to(device, dtype), torch.randn(b, 1, c, generator=gen).to(
            device, dtype), torch.randn(b, r, 2 * c, generator=gen).to(device, dtype),
            torch.randn(ratio, c, generator=gen).to(device), torch.full((b, 1), t - 1, dtype=torch.int64,
                                                                          device=device))
        run = lambda: compress(*args, past=t - 1, ratio=ratio, overlap=overlap)[0]  # noqa: E731
        want = get_op("v4.compress").reference_fn(*[a[:2] if i != 3 else a for i, a in enumerate(args)],
                                                  torch.zeros(2, t - 1, 0, device=device), ratio=ratio,
                                                  overlap=overlap)[0]
        nbytes = b * ((r + 1) * 2 * c * el + c // (2 if overlap else 1) * el) + ratio * c * 4
        rows.append({"kernel": f"compress_{kind}", "batch": b, "T": t, "topk": 0, "launch": "-",
                     "rel_err": rel_err(run()[:2], want), "us": timed_us(run, device),
                     "floor_us": nbytes / BANDWIDTH * 1e6})
    return rows


def topk_row(b, t, ratio, k, device, gen) -> dict:
    """The decode query at t - 1 over the scores of the t // ratio compact entries."""
    logits = torch.randn(b, 1, t // ratio, generator=gen).to(device)
    pos = torch.full((b, 1), t - 1, dtype=torch.int64, device=device)
    want = get_op("indexer.topk").reference_fn(get_op("indexer.slot_mask").reference_fn(logits[:2], pos[:2],
                                                                                        ratio=ratio), k=k)
    run = lambda: topk(logits, k, slot_ratio=ratio, positions=pos)  # noqa: E731
    same = torch.equal(run()[:2], want)
    return {"kernel": "topk_slot_mask", "batch": b, "T": t, "topk": k, "launch": "-", "rel_err": 0.0 if same else 1.0,
            "us": timed_us(run, device), "floor_us": b * (t // ratio) * 4 / BANDWIDTH * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (the interpreter on the CPU)")
    ap.add_argument("--sweep", action="store_true", help="time the attention rows at every launch of LAUNCHES")
    args = ap.parse_args()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    if args.tiny:
        h, d, t, window, batches, att, cmp, sel = 4, 32, 64, 8, [2], [("sliding", 0, 0), ("csa", 4, 3),
                                                                       ("hca", 8, 0)], [("csa", 4), ("hca", 8)], 3
    else:
        h, d, t, window, batches, att, cmp, sel = 64, 512, 8192, 128, [1, 64], [("sliding", 0, 0), ("csa", 4, 512),
                                                                               ("hca", 128, 0)], [("csa", 4),
                                                                                                  ("hca", 128)], 512
    rows = []
    for b in batches:
        rows += attention_rows(b, h, d, t, window, att, dtype, args.device, gen, args.sweep)
        rows += compress_rows(b, d, t, cmp, dtype, args.device, gen)
        rows.append(topk_row(b, t, 4, sel, args.device, gen))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    bad = []
    for r in rows:
        head = f"{r['kernel']:<22} B={r['batch']:<3} T={r['T']} K={r['topk']:<4} heads/splits={r['launch']:<9}"
        if "error" in r:
            print(f"{head}  FAILED: {r['error'][:500]}")
            bad.append(r)
            continue
        print(f"{head}  rel err {r['rel_err']:.1e}  {r['us']:8.2f} us  floor {r['floor_us']:6.2f} us  "
              f"{100 * r['floor_us'] / r['us']:5.1f} % of floor")
        if not r["rel_err"] <= (0.0 if r["kernel"] == "topk_slot_mask" else tol):
            bad.append(r)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "v4_attention_gpu.json").write_text(json.dumps({"results": rows}, indent=1))
    if bad:
        raise SystemExit(f"{len(bad)} of {len(rows)} rows failed or missed their tolerance: "
                         f"{[r['kernel'] for r in bad]}")


if __name__ == "__main__":
    main()
