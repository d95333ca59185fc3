"""Triton attention templates on a CUDA GPU: correctness at real shapes (bf16 vs the fp32 op reference), timing
(median of triton.testing.do_bench) beside eager torch, and a sweep over launch configs to pick the defaults.

    python benchmarks/attention_gpu.py            # checks, timings, config sweep; JSON to $OUT if set
    python benchmarks/attention_gpu.py --quick    # no sweep: default and tune=True launches only

Floors are bytes / 3.0 TB/s (the project H100's measured copy bandwidth). MLA bytes = the 576-wide latent cache
read once + q + out; flash bytes = q + k + v + out (prefill is compute-bound, so its floor is loose).
Goals (issue 5): MLA decode 128 heads, batch 64, cache 4096 <= 200 us; batch 1 <= 45 us.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
from dsgraph.backends.triton.kernels.flash_attention import FlashConfig, flash_attention  # noqa: E402
from dsgraph.backends.triton.kernels.mla_decode import MLAConfig, mla_absorbed, mla_num_splits  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph

from dsgraph.ops.attention import attention_ref, mla_absorbed_ref  # noqa: E402

BANDWIDTH = 3.0e12
C, R = 512, 64
MLA_SHAPES = {  # name: (batch, S, heads, cache length)
    "mla_h128_b64_t4096": (64, 1, 128, 4096),
    "mla_h128_b1_t4096": (1, 1, 128, 4096),
    "mla_h16_b64_t4096": (64, 1, 16, 4096),
    "mla_h16_b1_t4096": (1, 1, 16, 4096),
    "mla_h128_b64_t4096_mtp2": (64, 2, 128, 4096),
}
FLASH_SHAPES = {  # name: (batch, S, T, Hq, Hkv, D, Dv)
    "flash_mla_naive_h16_s4096": (1, 4096, 4096, 16, 16, 192, 128),
    "flash_gqa_h32kv8_s4096": (1, 4096, 4096, 32, 8, 128, 128),
    "flash_mla_naive_h128_s1024_b4": (4, 1024, 1024, 128, 128, 192, 128),
}


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_us(fn):
    """Plain launches, L2 flushed between calls: includes the host's launch overhead where it exceeds the kernel."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def graph_us(fn):
    """CUDA-graph replay, as the decode runtime runs it: no host overhead (L2 is not flushed, which flatters
    only the batch-1 shape, whose 4.7 MB cache fits in L2)."""
    return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def eager_mla(q, cache, scale):
    """What a plain torch user writes: bf16 matmuls, fp32 softmax (decode: no causal mask needed for S == 1)."""
    s = torch.einsum("bshc,btc->bsht", q, cache).float() * scale
    if q.shape[1] > 1:
        t, sq = cache.shape[1], q.shape[1]
        keep = torch.arange(t, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + t - sq
        s = s.masked_fill(~keep[None, :, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return torch.einsum("bsht,btc->bshc", p, cache[..., :C])


def mla_ref_fp32(q, cache, scale):
    """`mla_absorbed_ref` without its head expansion (which would materialise a 72 GiB fp32 K at batch 64, 128
    heads): the same fp32 math with the cache broadcast over heads. Cross-checked against the op reference on
    two requests in `run_mla`."""
    s = torch.einsum("bshc,btc->bsht", q.float(), cache.float()) * scale
    t, sq = cache.shape[1], q.shape[1]
    keep = torch.arange(t, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + t - sq
    p = torch.softmax(s.masked_fill(~keep[None, :, None, :], float("-inf")), dim=-1)
    return torch.einsum("bsht,btc->bshc", p, cache[..., :C].float())


def eager_sdpa(q, k, v, scale):
    """torch SDPA (causal with S == T); GQA by repeating kv heads."""
    g = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(g, dim=2) if g > 1 else x for x in (k, v))
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         is_causal=True, scale=scale)
    return o.transpose(1, 2)


def try_time(fn):
    """Time one launch config; configs that do not compile (shared memory, registers) report the error."""
    try:
        fn()
        torch.cuda.synchronize()
        return bench_us(fn), None
    except Exception as e:  # noqa: BLE001 -- a sweep records failing configs instead of stopping
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def mla_sweep(q, cache, scale, rows, b, t):
    """Two stages: tiles at the heuristic split count, then split counts with the best tile."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    base_splits = mla_num_splits(b, rows, t, sms)
    results = []
    tiles = [(bh, bn, w, st) for bh, bn, w, st in itertools.product((16, 32, 64), (16, 32, 64), (4, 8), (1, 2, 3))
             if bh <= max(16, triton.next_power_of_2(rows))]
    for bh, bn, w, st in tiles:
        cfg = MLAConfig(bh, bn, base_splits, w, st)
        us, err = try_time(lambda: mla_absorbed(q, cache, scale, C, config=cfg))
        results.append({"config": cfg.__dict__, "us": us, "error": err})
    ok = [r for r in results if r["us"] is not None]
    if not ok:
        return results
    best = dict(min(ok, key=lambda r: r["us"])["config"])
    for splits in sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128} - {base_splits}):
        if splits > t // 32:
            continue
        cfg = MLAConfig(**{**best, "num_splits": splits})
        us, err = try_time(lambda: mla_absorbed(q, cache, scale, C, config=cfg))
        results.append({"config": cfg.__dict__, "us": us, "error": err})
    return results


def flash_sweep(q, k, v, scale):
    results = []
    for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)):
        cfg = FlashConfig(bm, bn, w, st)
        us, err = try_time(lambda: flash_attention(q, k, v, scale, config=cfg))
        results.append({"config": cfg.__dict__, "us": us, "error": err})
    return results


def best_of(sweep):
    ok = [r for r in sweep if r["us"] is not None]
    return min(ok, key=lambda r: r["us"]) if ok else None


def run_mla(name, shape, sweep):
    b, s, h, t = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, s, h, C + R, device="cuda", dtype=torch.bfloat16, generator=gen)
    cache = torch.randn(b, t, C + R, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = (C + R) ** -0.5
    assert rel_err(mla_ref_fp32(q[:2], cache[:2], scale), mla_absorbed_ref(q[:2], cache[:2], scale, True, C)) < 1e-5
    ref = mla_ref_fp32(q, cache, scale)
    out = mla_absorbed(q, cache, scale, C)
    err, eager_err = rel_err(out, ref), rel_err(eager_mla(q, cache, scale), ref)
    floor = (cache.numel() + q.numel() + out.numel()) * 2 / BANDWIDTH * 1e6
    row = {"name": name, "shape": dict(batch=b, S=s, heads=h, cache=t), "rel_err": err, "eager_rel_err": eager_err,
           "triton_default_us": bench_us(lambda: mla_absorbed(q, cache, scale, C)),
           "triton_graph_us": graph_us(lambda: mla_absorbed(q, cache, scale, C)),
           "eager_us": bench_us(lambda: eager_mla(q, cache, scale)), "floor_us": floor}
    tuned = mla_absorbed(q, cache, scale, C, tune=True)
    row["tuned_rel_err"] = rel_err(tuned, ref)
    row["tuned_graph_us"] = graph_us(lambda: mla_absorbed(q, cache, scale, C, tune=True))
    if sweep:
        row["sweep"] = mla_sweep(q, cache, scale, s * h, b, t)
        best = best_of(row["sweep"])
        row["best_us"], row["best_config"] = (best["us"], best["config"]) if best else (None, None)
        if best:  # the best config must be right too, not just fast
            cfg = MLAConfig(**best["config"])
            row["best_rel_err"] = rel_err(mla_absorbed(q, cache, scale, C, config=cfg), ref)
            row["best_graph_us"] = graph_us(lambda: mla_absorbed(q, cache, scale, C, config=cfg))
    return row


def run_flash(name, shape, sweep):
    b, s, t, hq, hkv, d, dv = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(b, t, hkv, dv, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = d ** -0.5
    out = flash_attention(q, k, v, scale)
    ref = attention_ref(q, k, v, scale, True)
    row = {"name": name, "shape": dict(batch=b, S=s, T=t, hq=hq, hkv=hkv, d=d, dv=dv), "rel_err": rel_err(out, ref)}
    del ref
    flops = 2 * b * hq * (s * t - s * (s - 1) / 2) * (d + dv)  # causal with S == T: half the score matrix
    row["floor_us"] = (q.numel() + k.numel() + v.numel() + out.numel()) * 2 / BANDWIDTH * 1e6
    row["triton_default_us"] = bench_us(lambda: flash_attention(q, k, v, scale))
    row["triton_tflops"] = flops / row["triton_default_us"] / 1e6
    sdpa_us, sdpa_err = try_time(lambda: eager_sdpa(q, k, v, scale))
    row["eager_us"], row["eager_note"] = sdpa_us, sdpa_err or "torch SDPA (bf16)"
    if sweep:
        row["sweep"] = flash_sweep(q, k, v, scale)
        best = best_of(row["sweep"])
        row["best_us"], row["best_config"] = (best["us"], best["config"]) if best else (None, None)
    return row


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the config sweep")
    ap.add_argument("--only", default="", help="comma-separated workload names (default: all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_gpu.py needs a CUDA GPU")
    only = set(filter(None, args.only.split(",")))
    rows, t0 = [], time.time()
    for name, shape in MLA_SHAPES.items():
        if not only or name in only:
            rows.append(run_mla(name, shape, not args.quick))
            print(f"[{time.time() - t0:6.0f}s] {name} done", flush=True)
    for name, shape in FLASH_SHAPES.items():
        if not only or name in only:
            rows.append(run_flash(name, shape, not args.quick))
            print(f"[{time.time() - t0:6.0f}s] {name} done", flush=True)

    print(f"\n{torch.cuda.get_device_name(0)}, triton {triton.__version__}, torch {torch.__version__}")
    print("us = median microseconds; launch = do_bench (host overhead included), graph = CUDA-graph replay; "
          "default = heuristic config, tuned = tune=True, best = sweep winner")
    print(f"{'workload':32} {'rel_err':>8} {'floor':>7} {'eager':>7} {'default':>8} {'dflt graph':>10} "
          f"{'tuned graph':>11} {'best':>7} {'best graph':>10} {'x floor':>7}  best config")
    for r in rows:
        times = [r.get(k) for k in ("triton_default_us", "triton_graph_us", "tuned_graph_us", "best_us",
                                    "best_graph_us")]
        fast = min(x for x in times if x is not None)
        print(f"{r['name']:32} {r['rel_err']:8.1e} {fmt(r['floor_us']):>7} {fmt(r.get('eager_us')):>7} "
              f"{fmt(times[0]):>8} {fmt(times[1]):>10} {fmt(times[2]):>11} {fmt(times[3]):>7} {fmt(times[4]):>10} "
              f"{fmt(fast / r['floor_us'], '.2f'):>7}  {r.get('best_config') or ''}")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "attention_gpu.json"
        meta = {"device": torch.cuda.get_device_name(0), "triton": triton.__version__, "torch": torch.__version__}
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
