"""MoE layer on the GPU: correctness and timing of the Triton grouped-GEMM MoE (routing kernel + fused_moe) against the
eager per-expert reference and torch._grouped_mm, at DeepSeek-V2-Lite and V3 shapes, bf16.

    python benchmarks/moe_gpu.py            # prints a table; writes $OUT/moe_gpu.json when OUT is set
    python benchmarks/moe_gpu.py --sweep    # also every tile of TILES for each GEMM (CUDA-graph timed)

Times are medians of triton.testing.do_bench. The layer is routing (moe.gate: router GEMM + top-k) followed by the
routed experts, with fused_moe's tiles autotuned per GEMM; `breakdown` times its pieces from CUDA graphs. Floor =
the bytes of the experts actually hit, read once, at 3.0 TB/s. Goals (issue 5): V2-Lite 64 tokens <= 460 us, 1 token
<= 150 us.
"""
from __future__ import annotations

import json
import os
import sys

import torch
from dsgraph.backends.triton import autotune  # noqa: E402
from dsgraph.backends.triton.kernels import moe, routing  # noqa: E402

from dsgraph.ops.moe import moe_experts_ref  # noqa: E402

SHAPES = [  # name, experts, top_k, hidden, inter, routing attrs, token counts
    ("v2-lite", 64, 6, 2048, 1408, dict(scoring="softmax", method="greedy"), (1, 64, 512)),
    ("v3", 256, 8, 7168, 2048, dict(scoring="sigmoid", method="noaux_tc", n_group=8, topk_group=4,
                                    norm_topk_prob=True, routed_scaling_factor=2.5), (64, 512)),
]
TILES = {  # block_m: (block_n, block_k, warps, stages) swept per GEMM with --sweep
    16: [(bn, bk, 4, st) for bn in (16, 32, 64, 128) for bk in (64, 128, 256) for st in (3, 4, 5)]
        + [(64, 128, 8, 4), (128, 128, 8, 3), (64, 256, 8, 3)],
    32: [(bn, bk, w, st) for bn in (64, 128) for bk in (64, 128) for w in (4, 8) for st in (3, 4)],
    64: [(bn, bk, w, st) for bn in (64, 128, 256) for bk in (64, 128) for w in (4, 8) for st in (3, 4)],
}
BANDWIDTH = 3.0e12


def bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3  # us


def bench_graph(fn) -> float | str:
    """The same call replayed from a CUDA graph: kernel time without Python launch overhead."""
    import triton.testing
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
    except Exception as exc:  # a host sync inside fn cannot be captured
        return f"failed: {type(exc).__name__}"


def route_layer(x, gate_w, bias, k, attrs):
    """What the Triton backend runs for moe.gate on a GPU: fp32 cuBLAS router GEMM + the routing kernel."""
    return routing.route(torch.mm(x.float(), gate_w.t()), bias, top_k=k, **attrs)


def grouped_mm_layer(x, w, ids, gate_up, down):
    """torch._grouped_mm reference path: sort by expert, two grouped GEMMs, weighted scatter-add."""
    n, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=gate_up.shape[0]), 0).to(torch.int32)
    xs = x[order // k]
    gu = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
    g, u = gu.chunk(2, dim=-1)
    y = torch._grouped_mm((torch.nn.functional.silu(g) * u).to(x.dtype), down.transpose(1, 2), offs=offs)
    out = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, order // k, y.float() * w.reshape(-1)[order, None])
    return out.to(x.dtype)


def breakdown(x, w, ids, gate_up, down, sweep_tiles: bool) -> dict:
    """CUDA-graph times of fused_moe's pieces at the tuned configs: align (kernel and torch sort), each GEMM, the
    reduce; with `sweep_tiles`, every tile of TILES for each GEMM (fastest first, each checked against the
    default launch's output)."""
    n, k = ids.shape
    e, inter, m = gate_up.shape[0], gate_up.shape[1] // 2, ids.numel()
    bm = moe.moe_block_m(m, e)
    flat = ids.reshape(-1)
    row_ids, block_expert = moe.align_rows(flat, e, bm)
    act = torch.empty((row_ids.numel(), inter), dtype=x.dtype, device=x.device)
    y = torch.empty((m, x.shape[1]), dtype=torch.float32, device=x.device)
    fw = w.reshape(-1).float().contiguous()
    key = (e, inter, x.shape[1], k, moe.bucket(m), str(x.dtype))
    up_cfg = autotune._MEMO[("fused_moe_gate_up", key)]  # fused_moe ran (and tuned) this shape already
    down_cfg = autotune._MEMO[("fused_moe_down", key)]
    gemm_up = lambda c: moe._launch_gemm(x, gate_up, act, row_ids, block_expert, None, m, inter, c,  # noqa: E731
                                         a_div=k, c_padded=True, swiglu=True)
    gemm_down = lambda c: moe._launch_gemm(act, down, y, row_ids, block_expert, fw, m, x.shape[1], c,  # noqa: E731
                                           a_padded=True)
    out = torch.empty_like(x)
    res = {"block_m": bm, "gate_up_config": up_cfg.__dict__, "down_config": down_cfg.__dict__,
           "align_kernel_graph_us": bench_graph(lambda: moe.align_rows(flat, e, bm)),
           "align_torch_graph_us": bench_graph(lambda: moe.align(flat, moe.expert_counts(flat, e), m, bm)),
           "gate_up_graph_us": bench_graph(lambda: gemm_up(up_cfg)),
           "down_graph_us": bench_graph(lambda: gemm_down(down_cfg)),
           "reduce_graph_us": bench_graph(lambda: moe._reduce(y, None, None, out, k))}
    if sweep_tiles:
        gemm_up(up_cfg)
        act_ref = act.clone()
        gemm_down(down_cfg)
        y_ref = y.clone()
        for name, fn, ref, dst in (("gate_up", gemm_up, act_ref, act), ("down", gemm_down, y_ref, y)):
            times = []
            for t in TILES[bm]:
                cfg = moe.MoEConfig(bm, *t)
                try:
                    if name == "down":
                        act.copy_(act_ref)
                    fn(cfg)
                    torch.cuda.synchronize()
                    bad = (dst.float() - ref.float()).norm() / ref.float().norm() > 2e-2
                    us = bench_graph(lambda: fn(cfg))
                    times.append((us if isinstance(us, float) else float("inf"), t, "WRONG" if bad else "ok"))
                except Exception as exc:  # noqa: BLE001 -- a tile too big for this GPU
                    times.append((float("inf"), t, type(exc).__name__))
            times.sort(key=lambda r: r[0])
            res[f"{name}_sweep"] = [{"us": u, "tile": list(t), "status": st} for u, t, st in times]
            print(f"   {name} sweep (bm={bm}): " + ", ".join(f"{t}={u:.1f}us {st}" for u, t, st in times[:5]),
                  flush=True)
        act.copy_(act_ref)
    return res


def main() -> None:
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    sweep_tiles = "--sweep" in sys.argv
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    rows = []
    for name, e, k, h, inter, attrs, tokens in SHAPES:
        gate_up = torch.randn(e, 2 * inter, h, device=dev, dtype=dt) / h ** 0.5
        down = torch.randn(e, h, inter, device=dev, dtype=dt) / inter ** 0.5
        gate_w = torch.randn(e, h, device=dev, dtype=torch.float32) / h ** 0.5
        bias = torch.randn(e, device=dev) * 0.01 if attrs["method"] == "noaux_tc" else None
        per_expert = [t for j in range(e) for t in (gate_up[j, :inter], gate_up[j, inter:], down[j])]
        for n in tokens:
            x = torch.randn(n, h, device=dev, dtype=dt)
            w, ids = route_layer(x, gate_w, bias, k, attrs)
            hit = int(torch.unique(ids).numel())
            floor_us = hit * 3 * h * inter * 2 / BANDWIDTH * 1e6
            ref = moe_experts_ref(x, w, ids, *per_expert, num_experts=e)
            out = moe.fused_moe(x, w, ids, gate_up, down)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            row = {"shape": name, "tokens": n, "experts_hit": hit, "floor_us": floor_us, "rel_err": err}
            row["route_us"] = bench(lambda: route_layer(x, gate_w, bias, k, attrs))
            row["triton_autotuned_us"] = bench(lambda: moe.fused_moe(x, w, ids, gate_up, down))
            row["route_graph_us"] = bench_graph(lambda: route_layer(x, gate_w, bias, k, attrs))
            row["triton_graph_us"] = bench_graph(lambda: moe.fused_moe(x, w, ids, gate_up, down))
            row.update(breakdown(x, w, ids, gate_up, down, sweep_tiles))
            row["layer_us"] = row["route_us"] + row["triton_autotuned_us"]
            if hasattr(torch, "_grouped_mm"):
                try:
                    row["grouped_mm_us"] = bench(lambda: grouped_mm_layer(x, w, ids, gate_up, down))
                except Exception as exc:
                    row["grouped_mm_us"] = f"failed: {type(exc).__name__}: {exc}"[:120]
            if n <= 64 or name == "v2-lite":
                row["eager_us"] = bench(lambda: moe_experts_ref(x, w, ids, *per_expert, num_experts=e))
            row["floor_ratio"] = floor_us / row["triton_autotuned_us"]
            rows.append(row)
            print(f"{name:8} N={n:4} hit={hit:3} err={err:.2e} route={row['route_us']:8.1f}us "
                  f"moe={row['triton_autotuned_us']:8.1f}us "
                  f"floor={floor_us:7.1f}us ({row['floor_ratio']:.0%}) grouped_mm={row.get('grouped_mm_us', '-')} "
                  f"eager={row.get('eager_us', '-')} | CUDA graph: route={row['route_graph_us']} "
                  f"moe={row['triton_graph_us']}", flush=True)
    goals = {("v2-lite", 64): 460.0, ("v2-lite", 1): 150.0}
    for r in rows:
        goal = goals.get((r["shape"], r["tokens"]))
        if goal:
            r["goal_us"], r["goal_met"] = goal, r["layer_us"] <= goal
            graphed = [r["route_graph_us"], r["triton_graph_us"]]
            r["layer_graph_us"] = sum(graphed) if all(isinstance(t, float) for t in graphed) else None
            print(f"goal {r['shape']} N={r['tokens']}: layer {r['layer_us']:.1f}us (CUDA graph: "
                  f"{r['layer_graph_us']}) vs <= {goal}us: {'met' if r['goal_met'] else 'MISSED'}")
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "moe_gpu.json")
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()
