"""DeepSeek-V3.2's sparse attention kernels on a GPU: sparse absorbed-MLA decode at V3.2's shape (128 heads, top-2048
of the 576-wide latent cache), the lightning indexer's scores per decode step, and dense V3 MLA decode at the same
context, side by side; each checked against its op reference, timed (median of CUDA-graph replays) with its floor.

    python benchmarks/dsa_gpu.py                   # B = 64, T = 32768 and 131072, bf16; JSON to $OUT if set
    python benchmarks/dsa_gpu.py --tiny --device cpu   # the same rows at toy sizes on Triton's interpreter

Sparse decode: bytes = the K gathered rows of 576 bf16 per request (+ q, out), FLOPs = 2 * B * H * K * (576 + 512);
`sparse_mla_fp8` reads FlashMLA's 656-byte FP8 rows instead (512 e4m3 + 4 fp32 scales + 64 bf16 RoPE), dequantised
in the kernel; dense decode reads all T rows. The indexer's rows: bf16 scores and the FP8 path (`indexer_fp8`: e4m3
keys + one fp32 scale per token, as the reference's key cache), then the top-k select over the T logits (`topk`:
its floor is one read of the logits; the kernel makes 5 passes over them).
FlashMLA's published sparse FP8 decode reaches 410 TFLOPS on an H800 (FlashMLA
docs/20250929-hopper-fp8-sparse-deep-dive.md): the `tflops` column is what to compare with it.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from dsgraph.backends.triton.kernels.dsa import indexer_logits, sparse_mla
from dsgraph.backends.triton.kernels.mla_decode import mla_absorbed
from dsgraph.backends.triton.kernels.topk import topk

from dsgraph.ops import get_op
from dsgraph.ops.dsa_fp8 import rotate_quant_rows

BANDWIDTH = 4.8e12   # H200 HBM3e peak, bytes/s
C, R = 512, 64


def timed_us(fn, device: str) -> float:
    if device == "cpu":
        return float("nan")   # the interpreter's time says nothing about the kernel
    from triton.testing import do_bench_cudagraph  # a GPU-only measurement
    return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def rel_err(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def rows_for(b: int, h: int, t: int, k: int, hi: int, di: int, dtype, device: str, gen) -> list[dict]:
    """Sparse MLA, indexer scores and dense MLA decode (S = 1) of one shape, checked on the first two requests. Each
    row runs on its own: one that raises reports its error in the row, and the others still run."""
    q = torch.randn(b, 1, h, C + R, generator=gen).to(device, dtype)
    cache = torch.randn(b, t, C + R, generator=gen).to(device, dtype)
    idx = torch.stack([torch.randperm(t, generator=gen)[:k] for _ in range(b)])[:, None].to(device)
    iq = torch.randn(b, 1, hi, di, generator=gen).to(device, dtype)
    ik, iw = torch.randn(b, t, di, generator=gen).to(device, dtype), torch.randn(b, 1, hi, generator=gen).to(device)
    scale = (192 ** -0.5)
    flops_mla = 2 * b * h * k * (2 * C + R)

    def sparse():
        got = sparse_mla(q, cache, idx, scale, C)
        want = get_op("attention.mla_sparse_absorbed").reference_fn(q[:2], cache[:2], idx[:2], scale=scale,
                                                                       causal=True, kv_lora_rank=C)
        nbytes = b * k * (C + R) * cache.element_size() + q.numel() * q.element_size() \
            + got.numel() * got.element_size()
        return rel_err(got[:2], want), timed_us(lambda: sparse_mla(q, cache, idx, scale, C), device), nbytes, \
            flops_mla

    def indexer():
        logits = indexer_logits(iq, ik, iw, 0.01)
        want = get_op("indexer.logits").reference_fn(iq[:2], ik[:2], iw[:2], scale=0.01, causal=True)
        return (rel_err(logits[:2], want), timed_us(lambda: indexer_logits(iq, ik, iw, 0.01), device),
                b * t * di * ik.element_size() + b * t * 4, 2 * b * hi * t * di)

    def sparse_fp8():
        rows, scales = get_op("kv.quant_fp8").reference_fn(cache[..., :C], group=128)
        rope = cache[..., C:].contiguous()
        got = sparse_mla(q, rows, idx, scale, C, cache_scale=scales, cache_rope=rope)
        deq = torch.cat((get_op("kv.dequant_fp8").reference_fn(rows[:2], scales[:2], group=128, dtype="float32")
                         .to(dtype), rope[:2]), -1)
        want = get_op("attention.mla_sparse_absorbed").reference_fn(q[:2], deq, idx[:2], scale=scale, causal=True,
                                                                       kv_lora_rank=C)
        nbytes = b * k * (C + 4 * C // 128 + R * rope.element_size()) + q.numel() * q.element_size() \
            + got.numel() * got.element_size()
        return (rel_err(got[:2], want),
                timed_us(lambda: sparse_mla(q, rows, idx, scale, C, cache_scale=scales, cache_rope=rope), device),
                nbytes, flops_mla)

    def indexer_fp8():
        (q8, qs), (k8, ks) = rotate_quant_rows(iq), rotate_quant_rows(ik)
        qs, ks = qs[..., 0], ks[..., 0]
        got = indexer_logits(q8, k8, iw, 0.01, q_scale=qs, k_scale=ks)
        want = get_op("indexer.logits").reference_fn(iq[:2], ik[:2], iw[:2], scale=0.01, causal=True, fp8=True)
        return (rel_err(got[:2], want),
                timed_us(lambda: indexer_logits(q8, k8, iw, 0.01, q_scale=qs, k_scale=ks), device),
                b * t * (di + 4) + b * t * 4, 2 * b * hi * t * di)

    def select():
        logits = torch.randn(b, 1, t, generator=gen).to(device)
        same = torch.equal(topk(logits, k)[:2], get_op("indexer.topk").reference_fn(logits[:2], k=k))
        return 0.0 if same else 1.0, timed_us(lambda: topk(logits, k), device), b * t * 4, 0

    def dense():
        got = mla_absorbed(q, cache, scale, C)
        want = get_op("attention.mla_absorbed").reference_fn(q[:2], cache[:2], scale=scale, causal=True,
                                                             kv_lora_rank=C)
        return (rel_err(got[:2], want), timed_us(lambda: mla_absorbed(q, cache, scale, C), device),
                b * t * (C + R) * cache.element_size(), 2 * b * h * t * (2 * C + R))

    out = []
    for name, heads, run in [("sparse_mla", h, sparse), ("indexer_logits", hi, indexer),
                             ("sparse_mla_fp8", h, sparse_fp8), ("indexer_fp8", hi, indexer_fp8), ("topk", 1, select),
                             ("dense_mla", h, dense)]:
        row = {"kernel": name, "batch": b, "heads": heads, "T": t, "topk": k}
        try:
            err, us, nbytes, flops = run()
        except Exception as e:  # noqa: BLE001  (a benchmark row that fails says why; the other rows still run)
            out.append({**row, "error": f"{type(e).__name__}: {e}"})
            continue
        out.append({**row, "rel_err": err, "us": us, "floor_us": nbytes / BANDWIDTH * 1e6,
                    "tflops": flops / us / 1e6 if us == us and flops else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (the interpreter on the CPU)")
    args = ap.parse_args()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 64, 16, 4, 32)] if args.tiny else [(64, 128, 32768, 2048, 64, 128),
                                                        (64, 128, 131072, 2048, 64, 128)]
    rows = [r for shape in shapes for r in rows_for(*shape, dtype, args.device, gen)]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    # vs the dequantised refs; exact picks. Hopper's FP8 tensor-core dots accumulate in ~14 bits (DeepSeek-V3
    # report, section 3.3.2): the H200 measured 1.5e-4 for the e4m3 indexer against the fp32 reference
    tols = {"sparse_mla_fp8": 2e-2, "indexer_fp8": 1e-3, "topk": 0.0}
    bad = []
    for r in rows:
        head = f"{r['kernel']:<15} B={r['batch']} H={r['heads']} T={r['T']} K={r['topk']}"
        if "error" in r:
            print(f"{head}  FAILED: {r['error'][:500]}")
            bad.append(r)
            continue
        print(f"{head}  rel err {r['rel_err']:.1e}  {r['us']:.1f} us  floor {r['floor_us']:.1f} us  "
              f"{r['tflops'] or float('nan'):.1f} TFLOPS")
        if not r["rel_err"] <= tols.get(r["kernel"], tol):
            bad.append(r)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "dsa_gpu.json").write_text(json.dumps({"results": rows}, indent=1))
    if bad:
        raise SystemExit(f"{len(bad)} of {len(rows)} rows failed or missed their tolerance: "
                         f"{[r['kernel'] for r in bad]}")


if __name__ == "__main__":
    main()
