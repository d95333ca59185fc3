"""The Gluon MLA decode kernel (backends/triton/kernels/mla_decode_gluon.py) against the split-KV Triton template,
side by side on one shape (default: 128 heads, B=64, T=4096, a third of the requests ragged).

    python benchmarks/mla_gluon_gpu.py                 # Hopper: both against fp32 torch, then timed; JSON to $OUT
    python benchmarks/mla_gluon_gpu.py --compile-only  # any machine: compile the kernel for sm_90 and report
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton


def host_us(run, calls: int = 20) -> float:
    """Host microseconds a call spends enqueueing (Python, argument handling, the launch): what a plain launch
    adds and a CUDA-graph replay removes. Few calls, so the GPU's queue never fills and blocks the host."""
    run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile-only", action="store_true", help="compile for sm_90 and report; no GPU needed")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--context", type=int, default=4096)
    a = p.parse_args(argv)
    from dsgraph.backends.triton.kernels.mla_decode_gluon import GLUON_CONFIG, compile_for_hopper
    if a.compile_only:
        print(json.dumps(compile_for_hopper()))
        return 0
    if not torch.cuda.is_available():
        sys.exit("mla_gluon_gpu.py needs a Hopper GPU (or --compile-only)")
    from dsgraph.backends.triton.kernels.mla_decode import mla_absorbed, mla_candidates
    from triton.testing import do_bench_cudagraph
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, t, c, r = a.batch, a.heads, a.context, 512, 64
    q = torch.randn(b, 1, h, c + r, device="cuda", dtype=torch.bfloat16, generator=gen)
    cache = torch.randn(b, t, c + r, device="cuda", dtype=torch.bfloat16, generator=gen)
    lens = torch.full((b,), t, dtype=torch.int32, device="cuda")
    lens[::3] = torch.randint(1, t, (len(lens[::3]),), generator=gen, device="cuda", dtype=torch.int32)
    scale = (c + r) ** -0.5
    s = torch.einsum("bshc,btc->bsht", q.float(), cache.float()) * scale
    s = s.masked_fill(torch.arange(t, device="cuda")[None, None, None, :] >= lens[:, None, None, None], float("-inf"))
    exact = torch.einsum("bsht,btc->bshc", torch.softmax(s, -1), cache[..., :c].float())
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    template = next(cfg for cfg in mla_candidates(b, h, t, sm) if cfg.kernel == "triton")
    row = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "shape": vars(a),
           "template_config": str(template)}
    for name, cfg in (("gluon", GLUON_CONFIG), ("triton", template)):
        run = lambda: mla_absorbed(q, cache, scale, c, cache_lens=lens, config=cfg, finite_tail=True)  # noqa: E731
        row[f"{name}_rel_err"] = ((run().float() - exact).norm() / exact.norm()).item()
        row[f"{name}_us"] = do_bench_cudagraph(run, rep=50, return_mode="median") * 1e3
        row[f"{name}_host_us"] = host_us(run)
    print(json.dumps(row, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "mla_gluon_gpu.json").write_text(json.dumps(row, indent=1))
    return 0 if row["gluon_rel_err"] < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
