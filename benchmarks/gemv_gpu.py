"""The decode GEMV template against cuBLAS on a CUDA GPU: correctness at real shapes (bf16 vs fp32 torch), time
from CUDA-graph replays (as a graphed decode step runs it), and a sweep over launch configs.

    python benchmarks/gemv_gpu.py            # DeepSeek-V2-Lite's decode projections; JSON to $OUT if set

Floors are the weight bytes at 3.0 TB/s (the project H100's measured copy bandwidth).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.triton.kernels.gemv import GemvConfig, gemv, gemv_candidates  # noqa: E402

BANDWIDTH = 3.0e12
SHAPES = {  # name: (N, K) of DeepSeek-V2-Lite's one-token projections
    "q_proj": (3072, 2048), "kv_a": (576, 2048), "o_proj": (2048, 2048), "shared_gate_up": (5632, 2048),
    "shared_down": (2048, 2816), "lm_head": (102400, 2048),
}


def us(fn) -> float:
    return do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3


def sweep(n: int, k: int):
    for bn, tile, warps, stages in itertools.product((2, 4, 8, 16), (4096, 8192), (4, 8), (3, 4)):
        bk = max(64, min(tile // bn, triton.next_power_of_2(k)))
        yield GemvConfig(bn, bk, warps, stages)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--no-sweep", action="store_true")
    a = p.parse_args(argv)
    rows = []
    for name, (n, k) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(n)
        x = torch.randn(a.rows, k, device="cuda", generator=g, dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) / k ** 0.5
        ref = torch.nn.functional.linear(x.float(), w.float())
        err = ((gemv(x, w).float() - ref).norm() / ref.norm()).item()
        floor = n * k * 2 / BANDWIDTH * 1e6
        row = {"shape": name, "N": n, "K": k, "rows": a.rows, "rel_err": err, "floor_us": floor,
               "cublas_us": us(lambda: torch.nn.functional.linear(x, w)),
               "default": gemv_candidates(k)[0].__dict__, "default_us": us(lambda: gemv(x, w)),
               "tuned_us": us(lambda: gemv(x, w, tune=True))}
        if not a.no_sweep:
            best = min(((us(lambda c=c: gemv(x, w, config=c)), c) for c in sweep(n, k)), key=lambda t: t[0])
            row["best_us"], row["best"] = best[0], best[1].__dict__
        rows.append(row)
        print(f"{name:15} N={n:6} K={k:5} err={err:.1e} floor={floor:6.1f}us cublas={row['cublas_us']:6.1f}us "
              f"gemv={row['default_us']:6.1f}us {row['default']} tuned={row['tuned_us']:6.1f}us "
              f"best={row.get('best_us', float('nan')):6.1f}us "
              f"{row.get('best')}", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "gemv_gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                         indent=1))
    return 0 if all(r["rel_err"] < 1e-2 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
