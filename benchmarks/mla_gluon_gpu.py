"""Experiment: absorbed-MLA decode as a warp-specialised Gluon kernel (Hopper), against the Triton template.

    python benchmarks/mla_gluon_gpu.py                 # H100: check against fp32 torch, time both; JSON to $OUT
    python benchmarks/mla_gluon_gpu.py --compile-only  # any machine: compile for sm_90 (no GPU needed)

Why (BENCHMARKS.md, "MLA decode kernel alone"): at 128 heads, B=64, T=4096 the Triton template sits at ~271 us
(goal <= 200). `tl.dot` splits each 64-head x 64-key score tile across the two warpgroups by keys, so each
re-reads all of q for 32 keys, and the softmax and P cross between them. Here every consumer warpgroup computes
the whole score tile itself and owns one 256-column half of the output:

- one loader warp streams the cache through TMA into a STAGES-deep ring (one ready and one free mbarrier a slot);
- consumer warpgroups 0 and 1 (the default partition and a 4-warp worker) each compute S = q K^T for all 64
  keys (wgmma m64n64, q and K from shared memory), the online softmax, and O_half += P V_half (P from registers,
  V_half = K's first or second 256 latent columns);
- nothing passes between the consumers, and each frees a slot once its PV product is done.

The score tile is computed twice (~1.5x the tensor work of one pass), which buys no cross-warpgroup traffic.
Scope: one query row per head (S=1), heads a multiple of 64, C=512, R=64, bf16, one split. Rows past a request's
length are read (masked out of the softmax), so they must hold finite values. Status: compiles for sm_90 with
Triton 3.6 (the device's version); not yet run on a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCK_H, BLOCK_N, HALF, ROPE = 64, 64, 256, 64  # heads and keys a tile, latent half, rope width
# Triton 3.6 (the device's) names the TMA load async_copy_global_to_shared; later releases call it async_load
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
LOG2E = math.log2(math.e)


@gluon.jit
def _load_partition(c_desc, cr_desc, k0_s, k1_s, kr_s, ready, free, row0, n_tiles, STAGES: gl.constexpr):
    """One warp: the cache rows of this request, tile by tile, into the ring (waits for a slot's two consumers)."""
    BN: gl.constexpr = c_desc.block_type.shape[0]
    HALF_C: gl.constexpr = c_desc.block_type.shape[1]
    for i in range(n_tiles):
        s = i % STAGES
        mbarrier.wait(free.index(s), ((i // STAGES) & 1) ^ 1)  # a fresh slot passes at once
        bar = ready.index(s)
        mbarrier.expect(bar, 2 * c_desc.block_type.nbytes + cr_desc.block_type.nbytes)
        row = row0 + i * BN
        _tma_load(c_desc, [row, 0], bar, k0_s.index(s))
        _tma_load(c_desc, [row, HALF_C], bar, k1_s.index(s))
        _tma_load(cr_desc, [row, 2 * HALF_C], bar, kr_s.index(s))


@gluon.jit
def _consume(SIDE: gl.constexpr, q0_s, q1_s, qr_s, k0_s, k1_s, kr_s, q_bar, ready, free, out_ptr, out_row0,
             rows_valid, kv_len, n_tiles, qk_scale, STAGES: gl.constexpr):
    """One warpgroup: the whole score tile, the online softmax, and output columns [SIDE*C/2, (SIDE+1)*C/2)."""
    BH: gl.constexpr = q0_s.type.shape[0]
    HALF_C: gl.constexpr = q0_s.type.shape[1]
    BN: gl.constexpr = k0_s.type.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HALF_C, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    mbarrier.wait(q_bar, 0)
    acc = gl.zeros([BH, HALF_C], gl.float32, o_layout)
    m_i = gl.full([BH], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([BH], gl.float32, row_s)
    cols = gl.arange(0, BN, gl.SliceLayout(0, s_layout))
    for i in range(n_tiles):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        sc = gl.zeros([BH, BN], gl.float32, s_layout)
        sc = warpgroup_mma(q0_s, k0_s.index(s).permute((1, 0)), sc, use_acc=False, is_async=True)
        sc = warpgroup_mma(q1_s, k1_s.index(s).permute((1, 0)), sc, is_async=True)
        sc = warpgroup_mma(qr_s, kr_s.index(s).permute((1, 0)), sc, is_async=True)
        sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc, ))
        sc = gl.where((i * BN + cols)[None, :] < kv_len, sc * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(sc, axis=1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        if SIDE == 0:
            acc = warpgroup_mma(p_op, k0_s.index(s), acc, is_async=True)
        else:
            acc = warpgroup_mma(p_op, k1_s.index(s), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(free.index(s), count=1)

    l_o = gl.convert_layout(l_i, row_o)
    out = acc / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
    rows = gl.arange(0, BH, row_o)
    cols_o = gl.arange(0, HALF_C, gl.SliceLayout(0, o_layout))
    ptrs = out_ptr + (out_row0 + rows).to(gl.int64)[:, None] * (2 * HALF_C) + SIDE * HALF_C + cols_o[None, :]
    gl.store(ptrs, out.to(gl.bfloat16), mask=(rows < rows_valid)[:, None])


@gluon.jit
def _mla_decode_gluon(q_desc, qr_desc, c_desc, cr_desc, lens_ptr, out_ptr, H, T, qk_scale,
                      STAGES: gl.constexpr):
    BH: gl.constexpr = q_desc.block_type.shape[0]
    HALF_C: gl.constexpr = q_desc.block_type.shape[1]
    R: gl.constexpr = qr_desc.block_type.shape[1]
    BN: gl.constexpr = c_desc.block_type.shape[0]
    pid_m = gl.program_id(0)
    b = gl.program_id(1)
    kv_len = gl.minimum(gl.load(lens_ptr + b), T)
    n_tiles = gl.cdiv(kv_len, BN)

    q0_s = gl.allocate_shared_memory(gl.bfloat16, [BH, HALF_C], q_desc.layout)
    q1_s = gl.allocate_shared_memory(gl.bfloat16, [BH, HALF_C], q_desc.layout)
    qr_s = gl.allocate_shared_memory(gl.bfloat16, [BH, R], qr_desc.layout)
    k0_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, HALF_C], c_desc.layout)
    k1_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, HALF_C], c_desc.layout)
    kr_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, R], cr_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(free.index(s), count=2)  # both consumers release a slot

    q_row = b * H + pid_m * BH
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes + qr_desc.block_type.nbytes)
    _tma_load(q_desc, [q_row, 0], q_bar, q0_s)
    _tma_load(q_desc, [q_row, HALF_C], q_bar, q1_s)
    _tma_load(qr_desc, [q_row, 2 * HALF_C], q_bar, qr_s)

    rows_valid = gl.minimum(H - pid_m * BH, BH)
    gl.warp_specialize([
        (_consume, (0, q0_s, q1_s, qr_s, k0_s, k1_s, kr_s, q_bar, ready, free, out_ptr, q_row, rows_valid, kv_len,
                    n_tiles, qk_scale, STAGES)),
        (_consume, (1, q0_s, q1_s, qr_s, k0_s, k1_s, kr_s, q_bar, ready, free, out_ptr, q_row, rows_valid, kv_len,
                    n_tiles, qk_scale, STAGES)),
        (_load_partition, (c_desc, cr_desc, k0_s, k1_s, kr_s, ready, free, b * T, n_tiles, STAGES)),
    ], [4, 1], [232, 24])


def _layouts():
    return (gl.NVMMASharedLayout.get_default_for([BLOCK_H, HALF], gl.bfloat16),
            gl.NVMMASharedLayout.get_default_for([BLOCK_H, ROPE], gl.bfloat16))


def mla_decode_gluon(q: torch.Tensor, cache: torch.Tensor, scale: float, lens: torch.Tensor,
                     stages: int = 2) -> torch.Tensor:
    """q [B, 1, H, 576], cache [B, T, 576] (both contiguous bf16), lens [B] int32 -> [B, 1, H, 512]."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    b, s, h, width = q.shape
    t = cache.shape[1]
    if s != 1 or h % BLOCK_H or width != 2 * HALF + ROPE or q.dtype != torch.bfloat16:
        raise ValueError(f"mla_decode_gluon: needs q [B, 1, H (multiple of {BLOCK_H}), {2 * HALF + ROPE}] bf16, "
                         f"got {tuple(q.shape)} {q.dtype}")
    q2, c2 = q.reshape(b * h, width), cache.reshape(b * t, width)
    wide, narrow = _layouts()
    desc = lambda x, rows, cols, lay: TensorDescriptor(x, list(x.shape), list(x.stride()), [rows, cols], lay)  # noqa: E731
    out = torch.empty((b, 1, h, 2 * HALF), dtype=q.dtype, device=q.device)
    _mla_decode_gluon[(h // BLOCK_H, b)](
        desc(q2, BLOCK_H, HALF, wide), desc(q2, BLOCK_H, ROPE, narrow), desc(c2, BLOCK_N, HALF, wide),
        desc(c2, BLOCK_N, ROPE, narrow), lens, out, h, t, scale * LOG2E, STAGES=stages, num_warps=4)
    return out


def compile_only(stages: int) -> dict:
    """Compile for sm_90 without a GPU; returns the kernel's shared memory and the wgmma shapes in its PTX."""
    import re

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    wide, narrow = _layouts()
    sig = {"q_desc": f"tensordesc<bf16[{BLOCK_H},{HALF}],{wide!r}>",
           "qr_desc": f"tensordesc<bf16[{BLOCK_H},{ROPE}],{narrow!r}>",
           "c_desc": f"tensordesc<bf16[{BLOCK_N},{HALF}],{wide!r}>",
           "cr_desc": f"tensordesc<bf16[{BLOCK_N},{ROPE}],{narrow!r}>",
           "lens_ptr": "*i32", "out_ptr": "*bf16", "H": "i32", "T": "i32", "qk_scale": "fp32", "STAGES": "constexpr"}
    names = _mla_decode_gluon.arg_names
    src = GluonASTSource(_mla_decode_gluon, sig, constexprs={(names.index("STAGES"),): stages})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = k.asm["ptx"]
    return {"shared_bytes": k.metadata.shared,
            "wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
            "setmaxnreg": ptx.count("setmaxnreg")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile-only", action="store_true", help="compile for sm_90 and report; no GPU needed")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--context", type=int, default=4096)
    a = p.parse_args(argv)
    if a.compile_only:
        print(json.dumps(compile_only(a.stages)))
        return 0
    if not torch.cuda.is_available():
        sys.exit("mla_gluon_gpu.py needs a Hopper GPU (or --compile-only)")
    from triton.testing import do_bench_cudagraph

    from backends.triton.kernels.mla_decode import mla_absorbed
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, t, c = a.batch, a.heads, a.context, 2 * HALF
    q = torch.randn(b, 1, h, c + ROPE, device="cuda", dtype=torch.bfloat16, generator=gen)
    cache = torch.randn(b, t, c + ROPE, device="cuda", dtype=torch.bfloat16, generator=gen)
    lens = torch.full((b,), t, dtype=torch.int32, device="cuda")
    lens[::3] = torch.randint(1, t, (len(lens[::3]),), generator=gen, device="cuda", dtype=torch.int32)
    scale = (c + ROPE) ** -0.5
    ref = mla_absorbed(q, cache, scale, c, cache_lens=lens)  # the tested Triton template
    s = torch.einsum("bshc,btc->bsht", q.float(), cache.float()) * scale
    s = s.masked_fill(torch.arange(t, device="cuda")[None, None, None, :] >= lens[:, None, None, None], float("-inf"))
    exact = torch.einsum("bsht,btc->bshc", torch.softmax(s, -1), cache[..., :c].float())
    out = mla_decode_gluon(q, cache, scale, lens, a.stages)
    rel = lambda x: ((x.float() - exact).norm() / exact.norm()).item()  # noqa: E731
    row = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "shape": vars(a),
           "gluon_rel_err": rel(out), "triton_rel_err": rel(ref),
           "gluon_us": do_bench_cudagraph(lambda: mla_decode_gluon(q, cache, scale, lens, a.stages), rep=50,
                                          return_mode="median") * 1e3,
           "triton_us": do_bench_cudagraph(lambda: mla_absorbed(q, cache, scale, c, cache_lens=lens), rep=50,
                                           return_mode="median") * 1e3}
    print(json.dumps(row, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "mla_gluon_gpu.json").write_text(json.dumps(row, indent=1))
    return 0 if row["gluon_rel_err"] < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
