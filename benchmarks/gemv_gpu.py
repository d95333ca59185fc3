"""The decode GEMV template against cuBLAS on a CUDA GPU: correctness at real shapes (bf16 vs fp32 torch), time
from CUDA-graph replays (as a graphed decode step runs it), and a sweep over launch configs. Covers the dense
projections (`gemv` vs F.linear) and MLA's per-head absorb einsums (`head_gemv` vs torch.einsum).

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
import torch.nn.functional as F
import triton
from dsgraph.backends.triton.kernels.gemv import GemvConfig, gemv, gemv_candidates, head_gemv  # noqa: E402
from triton.testing import do_bench_cudagraph

BANDWIDTH = 3.0e12
SHAPES = {  # name: (N, K) of DeepSeek-V2-Lite's one-token projections
    "q_proj": (3072, 2048), "kv_a": (576, 2048), "o_proj": (2048, 2048), "shared_gate_up": (5632, 2048),
    "shared_down": (2048, 2816), "lm_head": (102400, 2048),
}
HEADS, NOPE, LATENT = 16, 128, 512
EINSUMS = {"q_absorb": "bshd,hdc->bshc", "o_absorb": "bshc,hdc->bshd"}  # W_UK / W_UV [16, 128, 512]


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
    for name in [*SHAPES, *EINSUMS]:
        g = torch.Generator(device="cuda").manual_seed(len(rows))
        if name in SHAPES:
            n, k = SHAPES[name]
            x = torch.randn(a.rows, k, device="cuda", generator=g, dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) / k ** 0.5
            ref = torch.nn.functional.linear(x.float(), w.float())
            ours, library, weight_bytes = (lambda **kw: gemv(x, w, **kw)), (lambda: F.linear(x, w)), n * k * 2
        else:
            eq = EINSUMS[name]
            n, k = (LATENT, NOPE) if name == "q_absorb" else (NOPE, LATENT)
            x = torch.randn(a.rows, 1, HEADS, k, device="cuda", generator=g, dtype=torch.bfloat16)
            w = torch.randn(HEADS, NOPE, LATENT, device="cuda", generator=g, dtype=torch.bfloat16) / k ** 0.5
            ref = torch.einsum(eq, x.float(), w.float())
            hnk = w.transpose(1, 2) if name == "q_absorb" else w  # W_UK read column-major
            ours = lambda hnk=hnk, x=x, **kw: head_gemv(x, hnk, **kw)  # noqa: E731
            library, weight_bytes = (lambda eq=eq, x=x, w=w: torch.einsum(eq, x, w)), w.numel() * 2
        err = ((ours().float() - ref).norm() / ref.norm()).item()
        floor = weight_bytes / BANDWIDTH * 1e6
        row = {"shape": name, "N": n, "K": k, "rows": a.rows, "rel_err": err, "floor_us": floor,
               "cublas_us": us(library), "default": gemv_candidates(k)[0].__dict__, "default_us": us(ours),
               "tuned_us": us(lambda: ours(tune=True))}
        if not a.no_sweep:
            best = min(((us(lambda c=c: ours(config=c)), c) for c in sweep(n, k)), key=lambda t: t[0])
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
