"""DeepSeek-V4-Flash's routed experts on the GPU: the fused MoE straight off MXFP4 weights (moe_mxfp4.fused_moe_mxfp4)
against the bf16 grouped GEMM (moe.fused_moe on the dequantised weights), side by side at decode token counts.

    python benchmarks/mxfp4_moe_gpu.py                 # V4-Flash, 1 / 8 / 64 tokens, bf16; $OUT/mxfp4_moe_gpu.json
    python benchmarks/mxfp4_moe_gpu.py --tokens 1,64   # other token counts
    TRITON_INTERPRET=1 python benchmarks/mxfp4_moe_gpu.py --tiny   # the script's plumbing on the CPU (fp16, tiny)

Shapes from the deepseek-v4-flash preset (hidden 4096, moe_intermediate 2048, 256 experts, top-6, SwiGLU clamped
at swiglu_limit). Each kernel is checked against a torch reference (dequantise, then the naive per-expert loop in
fp32) before it is timed. Times: medians of CUDA events around one call, the L2 flushed before each (the weights
must come from HBM, as in a decode step). Floor: the weight bytes of the experts hit, read once, at 4.2 TB/s
(MXFP4: half a byte a weight + a scale byte per 32; bf16: 2 bytes). Goal (issue 21): MXFP4 >= 2.5x faster than
bf16 at 1-64 tokens. `decodes` times each MXFP4 path (ours, tl.dot_scaled, the GEMV) at one pinned tile, to show each
compile and what each costs; the autotuned row picks among both (`--decode ours|native` restricts both to one,
should one not compile here).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from dsgraph.backends.triton import autotune
from dsgraph.backends.triton.kernels import moe, moe_mxfp4
from dsgraph.models import preset_config

from dsgraph.numerics import rel_err, tolerance
from dsgraph.ops.v4_mix import swiglu_clamped_ref, unpack_e2m1

BANDWIDTH = 4.2e12
GOAL = 2.5


def mxfp4_experts(e, rows, cols, g):
    """Random packed e2m1 [E, rows, cols/2] with e8m0 scales [E, rows, cols/32] near 2**-7 (weights ~ 1/sqrt(H)),
    drawn on g's device (V4-Flash's 3 GiB of packed experts)."""
    w = torch.randint(-128, 128, (e, rows, cols // 2), generator=g, dtype=torch.int8, device=g.device)
    s = torch.randint(118, 123, (e, rows, cols // 32), generator=g, dtype=torch.uint8, device=g.device)
    return w, s


def dequant(w, s, dtype):
    """[E, rows, cols] in `dtype`, one expert at a time (a full fp32 copy of 256 experts would not fit)."""
    out = torch.empty((*w.shape[:2], w.shape[2] * 2), dtype=dtype, device=w.device)
    for j in range(w.shape[0]):
        scale = torch.exp2(s[j].float() - 127.0).repeat_interleave(moe_mxfp4.GROUP, dim=1)
        out[j] = (unpack_e2m1(w[j]) * scale).to(dtype)
    return out


def reference(x, w, ids, gate_up, down, limit):
    """The naive MoE in fp32 over the (exactly bf16-representable) dequantised weights, idle experts skipped."""
    inter = gate_up.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        y = swiglu_clamped_ref(x[t], gate_up[e, :inter], gate_up[e, inter:], down[e], limit=limit)
        out.index_add_(0, t, y * w[t, j, None].float())
    return out


def median_us(fn, reps: int, flush: torch.Tensor | None) -> float:
    """Median of `reps` timed calls (CUDA events; perf_counter on the CPU), the L2 overwritten before each."""
    fn()
    times = []
    for _ in range(reps):
        if flush is None:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
            continue
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def checked(name, fn, want, dtype) -> str | None:
    """None when fn's output matches `want` within the dtype's tolerance, else why not."""
    try:
        err = rel_err(fn().float(), want)
    except Exception as exc:  # noqa: BLE001 -- a decode that does not compile here is a result, not a crash
        return f"{name}: {type(exc).__name__}: {str(exc)[:200]}"
    return None if err < tolerance(str(dtype).removeprefix("torch.")) else f"{name}: rel_err {err:.3e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--decode", choices=("both", "ours", "native"), default="both",
                    help="the MXFP4 decodes the autotuner and the pinned rows may use (native: tl.dot_scaled)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU interpreter (fp16): plumbing only")
    args = ap.parse_args()
    cfg = preset_config("deepseek-v4-flash")
    e, k, h, inter, limit = (cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["hidden_size"],
                             cfg["moe_intermediate_size"], float(cfg["swiglu_limit"]))
    if args.tiny:
        e, k, h, inter, dev, dt, reps = 8, 2, 64, 64, "cpu", torch.float16, 2
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU (or --tiny on the CPU interpreter)"
        dev, dt, reps = "cuda", torch.bfloat16, args.reps
    g, g_dev = torch.Generator().manual_seed(0), torch.Generator(dev).manual_seed(1)
    gu_w, gu_s = mxfp4_experts(e, 2 * inter, h, g_dev)
    dn_w, dn_s = mxfp4_experts(e, h, inter, g_dev)
    gate_up, down = dequant(gu_w, gu_s, dt), dequant(dn_w, dn_s, dt)    # exact: e2m1 x 2**k fits bf16 / fp16
    flush = torch.empty(256 << 20, dtype=torch.int8, device=dev) if dev == "cuda" else None
    per_weight = {"mxfp4": 0.5 + 1 / moe_mxfp4.GROUP, "bf16": 2.0}
    native = {"both": None, "ours": False, "native": True}[args.decode]
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(n, h, generator=g).to(dev, dt)
        ids = torch.rand(n, e, generator=g).argsort(-1)[:, :k].to(dev)
        w = torch.rand(n, k, generator=g).to(dev)
        hit = int(ids.unique().numel())
        want = reference(x, w, ids, gate_up, down, limit)
        runs = {"mxfp4": lambda: moe_mxfp4.fused_moe_mxfp4(x, w, ids, gu_w, gu_s, dn_w, dn_s, limit=limit,
                                                           native=native),
                "bf16": lambda: moe.fused_moe(x, w, ids, gate_up, down, limit=limit)}
        row = {"tokens": n, "experts_hit": hit}
        for name, fn in runs.items():
            bad = checked(name, fn, want, dt)    # the first call also autotunes the tiles
            assert bad is None, bad
            floor = hit * 3 * h * inter * per_weight[name] / BANDWIDTH * 1e6
            us = median_us(fn, reps, flush)
            row.update({f"{name}_us": us, f"{name}_floor_us": floor, f"{name}_of_floor": floor / us})
        key = (e, inter, h, k, autotune.bucket(n * k), str(dt))
        tuned = "fused_moe_mxfp4" if native is None else f"fused_moe_mxfp4_{args.decode}"
        row["mxfp4_tiles"] = {s: getattr(autotune._MEMO.get((f"{tuned}_{s}", key)), "__dict__", None)
                              for s in ("gate_up", "down")}
        row["speedup"] = row["bf16_us"] / row["mxfp4_us"]
        row["goal_met"] = row["speedup"] >= GOAL
        row["decodes"] = {}
        bm = moe.moe_block_m(n * k, e)
        pins = {"ours": moe_mxfp4.MXFP4Config(bm, 64, 128, 4, 3), "dot_scaled": moe_mxfp4.MXFP4Config(
            bm, 64, 128, 4, 1, native=True), "gemv": moe_mxfp4.MXFP4Config(bm, 32, 512, 4, 1, gemv=2)}
        if args.tiny:
            pins = {"ours": moe_mxfp4.MXFP4Config(bm, 16, 64, 1, 1), "gemv": moe_mxfp4.MXFP4Config(bm, 16, 64, 1, 1,
                                                                                                  gemv=2)}
        if native is not None:
            pins = {"dot_scaled" if native else "ours": pins["dot_scaled" if native else "ours"]}
        for label, pin in pins.items():
            fn = lambda: moe_mxfp4.fused_moe_mxfp4(x, w, ids, gu_w, gu_s, dn_w, dn_s, config=pin,  # noqa: E731
                                                   limit=limit)
            bad = checked(label, fn, want, dt)
            row["decodes"][label] = bad or median_us(fn, reps, flush)
        rows.append(row)
        print(f"N={n:3} hit={hit:3} | mxfp4 {row['mxfp4_us']:8.1f} us ({row['mxfp4_of_floor']:4.0%} of "
              f"{row['mxfp4_floor_us']:.1f}) | bf16 {row['bf16_us']:8.1f} us ({row['bf16_of_floor']:4.0%} of "
              f"{row['bf16_floor_us']:.1f}) | speedup {row['speedup']:.2f}x (goal >= {GOAL}x: "
              f"{'met' if row['goal_met'] else 'MISSED'}) | pinned decodes {row['decodes']} | tiles "
              f"{row['mxfp4_tiles']}", flush=True)
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "mxfp4_moe_gpu.json")
        with open(path, "w") as f:
            device = torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)"
            json.dump({"device": device, "shape": {"experts": e, "top_k": k, "hidden": h, "inter": inter},
                       "rows": rows}, f, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()
