"""Absorbed-MLA one-token decode on Hopper as a warp-specialised Gluon kernel (`attention.mla_absorbed`).

Why a second kernel: at 128 heads, batch 64, cache 4096 the split-KV Triton template (mla_decode.py) sits at
~272 us on an H100. `tl.dot` splits each 64-head x 64-key score tile across the two warpgroups by keys, so each
re-reads all of q for 32 keys, and the softmax and P cross between them. Here every consumer warpgroup computes
the whole score tile itself and owns one 256-column half of the output (176 us on the same shape, BENCHMARKS.md):

- one loader warp streams the request's cache through TMA into a STAGES-deep ring (one ready and one free
  mbarrier a slot);
- consumer warpgroups 0 and 1 each compute S = q K^T for all 64 keys (wgmma m64n64, q and K from shared memory),
  the online softmax, and O_half += P V_half (P from registers, V_half = K's first or second 256 latent columns);
- nothing passes between the consumers, and each frees a slot once its PV product is done.

The score tile is computed twice (~1.5x the tensor work of one pass), which buys no cross-warpgroup traffic.

Scope (`fits` says why a call is outside it): sm_90, one query row (S=1), heads a multiple of 64, C=512, R=64,
bf16 or fp16, one split (so it is for batches that fill the GPU; the split-KV template serves batch 1). q and
the cache are read through 3-D descriptors ([B, H, W] and [B, T, C+R], any batch and head strides); rows past T
come in as zeros; rows in [cache_lens[b], T) are read and masked out of the softmax, so they must hold finite
values (`finite_tail`).
"""
from __future__ import annotations

import re

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .flash_attention import LOG2E
from .mla_config import MLAConfig

BLOCK_H, BLOCK_N, HALF, ROPE = 64, 64, 256, 64  # heads and keys a tile, latent half, rope width
STAGES = 2  # cache tiles in flight: 2 x 72 KB plus q's 72 KB fill the 227 KB of shared memory
# Triton 3.6 (the device's) names the TMA load async_copy_global_to_shared; later releases call it async_load
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
GLUON_CONFIG = MLAConfig(BLOCK_H, BLOCK_N, 1, 4, STAGES, kernel="gluon")  # the one launch this kernel has
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@gluon.jit
def _load_partition(c_desc, cr_desc, k0_s, k1_s, kr_s, ready, free, b, n_tiles, STAGES: gl.constexpr):
    """One warp: request b's cache rows, tile by tile, into the ring (waits for a slot's two consumers)."""
    BN: gl.constexpr = k0_s.shape[1]
    HALF_C: gl.constexpr = k0_s.shape[2]
    R: gl.constexpr = kr_s.shape[2]
    for i in range(n_tiles):
        s = i % STAGES
        mbarrier.wait(free.index(s), ((i // STAGES) & 1) ^ 1)  # a fresh slot passes at once
        bar = ready.index(s)
        mbarrier.expect(bar, 2 * c_desc.block_type.nbytes + cr_desc.block_type.nbytes)
        row = i * BN
        _tma_load(c_desc, [b, row, 0], bar, k0_s.index(s).reshape([1, BN, HALF_C]))
        _tma_load(c_desc, [b, row, HALF_C], bar, k1_s.index(s).reshape([1, BN, HALF_C]))
        _tma_load(cr_desc, [b, row, 2 * HALF_C], bar, kr_s.index(s).reshape([1, BN, R]))


@gluon.jit
def _consume(SIDE: gl.constexpr, q0_s, q1_s, qr_s, k0_s, k1_s, kr_s, q_bar, ready, free, out_ptr, out_row0,
             rows_valid, kv_len, n_tiles, qk_scale, STAGES: gl.constexpr):
    """One warpgroup: the whole score tile, the online softmax, and output columns [SIDE*C/2, (SIDE+1)*C/2)."""
    BH: gl.constexpr = q0_s.shape[0]
    HALF_C: gl.constexpr = q0_s.shape[1]
    BN: gl.constexpr = k0_s.shape[1]
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
        p_op = gl.convert_layout(p.to(k0_s.dtype), p_layout)
        if SIDE == 0:
            acc = warpgroup_mma(p_op, k0_s.index(s), acc, is_async=True)
        else:
            acc = warpgroup_mma(p_op, k1_s.index(s), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(free.index(s), count=1)

    l_o = gl.convert_layout(l_i, row_o)
    out = acc / gl.where(l_o == 0.0, 1.0, l_o)[:, None]  # a request with no key gives zeros
    rows = gl.arange(0, BH, row_o)
    cols_o = gl.arange(0, HALF_C, gl.SliceLayout(0, o_layout))
    ptrs = out_ptr + (out_row0 + rows).to(gl.int64)[:, None] * (2 * HALF_C) + SIDE * HALF_C + cols_o[None, :]
    gl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows < rows_valid)[:, None])


@gluon.jit
def _mla_decode_gluon(q_desc, qr_desc, c_desc, cr_desc, lens_ptr, out_ptr, H, T, qk_scale,
                      HAS_LENS: gl.constexpr, STAGES: gl.constexpr):
    BH: gl.constexpr = q_desc.block_type.shape[1]
    HALF_C: gl.constexpr = q_desc.block_type.shape[2]
    R: gl.constexpr = qr_desc.block_type.shape[2]
    BN: gl.constexpr = c_desc.block_type.shape[1]
    dtype: gl.constexpr = q_desc.dtype
    wide: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BH, HALF_C], dtype)  # the MMAs' 2-D view
    narrow: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BH, R], dtype)
    pid_m = gl.program_id(0)
    b = gl.program_id(1)
    if HAS_LENS:
        kv_len = gl.minimum(gl.load(lens_ptr + b).to(gl.int32), T)
    else:
        kv_len = T
    n_tiles = gl.cdiv(kv_len, BN)

    q0_s = gl.allocate_shared_memory(dtype, [BH, HALF_C], wide)
    q1_s = gl.allocate_shared_memory(dtype, [BH, HALF_C], wide)
    qr_s = gl.allocate_shared_memory(dtype, [BH, R], narrow)
    k0_s = gl.allocate_shared_memory(dtype, [STAGES, BN, HALF_C], wide)  # BN == BH: the same layouts fit
    k1_s = gl.allocate_shared_memory(dtype, [STAGES, BN, HALF_C], wide)
    kr_s = gl.allocate_shared_memory(dtype, [STAGES, BN, R], narrow)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(free.index(s), count=2)  # both consumers release a slot

    head0 = pid_m * BH
    q_row = b * H + head0  # of the [B*H, C] output
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes + qr_desc.block_type.nbytes)
    _tma_load(q_desc, [b, head0, 0], q_bar, q0_s.reshape([1, BH, HALF_C]))
    _tma_load(q_desc, [b, head0, HALF_C], q_bar, q1_s.reshape([1, BH, HALF_C]))
    _tma_load(qr_desc, [b, head0, 0], q_bar, qr_s.reshape([1, BH, R]))

    rows_valid = gl.minimum(H - head0, BH)
    gl.warp_specialize([
        (_consume, (0, q0_s, q1_s, qr_s, k0_s, k1_s, kr_s, q_bar, ready, free, out_ptr, q_row, rows_valid, kv_len,
                    n_tiles, qk_scale, STAGES)),
        (_consume, (1, q0_s, q1_s, qr_s, k0_s, k1_s, kr_s, q_bar, ready, free, out_ptr, q_row, rows_valid, kv_len,
                    n_tiles, qk_scale, STAGES)),
        (_load_partition, (c_desc, cr_desc, k0_s, k1_s, kr_s, ready, free, b, n_tiles, STAGES)),
    ], [4, 1], [232, 24])


def _layouts(dtype):
    """The TMA descriptors' shared-memory layouts (3-D: one request's rows), for latent halves and rope parts."""
    get = gl.NVMMASharedLayout.get_default_for
    return get([1, BLOCK_N, HALF], dtype), get([1, BLOCK_N, ROPE], dtype)


def _aligned(t: torch.Tensor) -> bool:
    """TMA's rule: a 16-byte aligned base and 16-byte multiples for every stride but the last (which is 1)."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s * size % 16 == 0 for s in t.stride()[:-1]))


def shape_unfit(s: int, h: int, c: int, r: int) -> str | None:
    """None if query rows S, heads H, latent C and rope R are the kernel's shapes, else which it needs."""
    if s != 1 or h % BLOCK_H or c != 2 * HALF or r != ROPE:
        return f"needs one query row, heads a multiple of {BLOCK_H}, C={2 * HALF}, R={ROPE}"
    return None


def fits(qc: torch.Tensor, qr: torch.Tensor, cache: torch.Tensor, cache_lens, finite_tail: bool) -> str | None:
    """None if the kernel can run this call on its (Hopper) GPU, else why not (qc [B,S,H,C], qr [B,S,H,R], cache
    [B,T,C+R])."""
    (_, s, h, c), r = qc.shape, qr.shape[3]
    unfit = shape_unfit(s, h, c, r)
    if unfit is not None:
        return unfit
    if qc.dtype not in _GL_DTYPES:
        return "needs bf16 or fp16"
    if cache_lens is not None and not finite_tail:
        return "rows past cache_lens may hold non-finite values (finite_tail=False)"
    if not all(map(_aligned, (qc[:, 0], qr[:, 0], cache))):
        return "q or the cache is not laid out for TMA (16-byte aligned base and strides, unit last stride)"
    return None


def mla_decode_gluon(qc: torch.Tensor, qr: torch.Tensor, cache: torch.Tensor, scale: float,
                     cache_lens: torch.Tensor | None = None) -> torch.Tensor:
    """qc [B,1,H,512], qr [B,1,H,64], cache [B,T,576] -> [B,1,H,512]; the caller checked `fits`."""
    b, _, h, c = qc.shape
    t = cache.shape[1]
    wide, narrow = _layouts(_GL_DTYPES[qc.dtype])
    desc = lambda x, block, lay: TensorDescriptor(x, list(x.shape), list(x.stride()), block, lay)  # noqa: E731
    q3, qr3 = qc[:, 0], qr[:, 0]  # [B, H, W]: any batch and head strides TMA can step
    out = torch.empty((b, 1, h, c), dtype=qc.dtype, device=qc.device)
    _mla_decode_gluon[(h // BLOCK_H, b)](
        desc(q3, [1, BLOCK_H, HALF], wide), desc(qr3, [1, BLOCK_H, ROPE], narrow),
        desc(cache, [1, BLOCK_N, HALF], wide), desc(cache, [1, BLOCK_N, ROPE], narrow),
        cache_lens if cache_lens is not None else out, out, h, t, scale * LOG2E,
        HAS_LENS=cache_lens is not None, STAGES=STAGES, num_warps=4)
    return out


def compile_for_hopper(has_lens: bool = True) -> dict:
    """Compile for sm_90 without a GPU; returns the kernel's shared memory, the wgmma shapes in its PTX and
    whether it is warp-specialised (CI checks these on a CPU machine)."""
    wide, narrow = _layouts(gl.bfloat16)
    sig = {"q_desc": f"tensordesc<bf16[1,{BLOCK_H},{HALF}],{wide!r}>",
           "qr_desc": f"tensordesc<bf16[1,{BLOCK_H},{ROPE}],{narrow!r}>",
           "c_desc": f"tensordesc<bf16[1,{BLOCK_N},{HALF}],{wide!r}>",
           "cr_desc": f"tensordesc<bf16[1,{BLOCK_N},{ROPE}],{narrow!r}>",
           "lens_ptr": "*i32", "out_ptr": "*bf16", "H": "i32", "T": "i32", "qk_scale": "fp32",
           "HAS_LENS": "constexpr", "STAGES": "constexpr"}
    names = _mla_decode_gluon.arg_names
    src = GluonASTSource(_mla_decode_gluon, sig, constexprs={(names.index("HAS_LENS"),): has_lens,
                                                            (names.index("STAGES"),): STAGES})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = k.asm["ptx"]
    return {"shared_bytes": k.metadata.shared,
            "wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
            "setmaxnreg": ptx.count("setmaxnreg")}
