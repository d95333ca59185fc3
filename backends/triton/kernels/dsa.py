"""DeepSeek Sparse Attention (V3.2) kernels: the lightning indexer's scores and sparse absorbed MLA over the rows it
selects (ops `indexer.logits` and `attention.mla_sparse_absorbed`, dsgraph/ops/dsa.py).

Indexer: one program per (query, BLOCK_T keys): q [H, D] @ k^T [D, BLOCK_T] on the tensor cores, ReLU, then the
weighted sum over heads as a [H] x [H, BLOCK_T] reduction -- the [B,S,H,T] score tensor is never written. Its FP8
path (DeepSeek-V3.2-Exp's `fp8_index`) takes e4m3 q and k with fp32 per-token scales: the dot runs on the e4m3
values, the q scales multiply the head weights and the k scales the reduced logits (positive scales pass through
the ReLU), so nothing is dequantised.

Sparse MLA: one program per (query, BLOCK_H heads). All heads of a query share its index list, so each [BLOCK_K,
C+R] tile of gathered latent rows is loaded once for BLOCK_H heads and serves as keys (all C+R columns) and values
(the first C). `-1` slots and slots past the query's causal horizon are masked; the softmax is the online one in
fp32. Prefill (S queries) and decode (S = 1) are the same launch; the work is O(S * K), not O(S * T). Over the
FP8 latent cache (kv_cache_dtype="fp8": e4m3 NoPE rows, fp32 group scales, RoPE rows in the compute dtype; ops
kv.quant_fp8 / kv.dequant_fp8) the kernel dequantises the gathered rows in registers: no dequantised copy of the
cache is written.

Both take `kv_lens` [B] (the device-side lengths of a static-capacity CUDA-graph decode step): rows at or past a
request's length score -inf in the indexer, so the top-k never selects them, and are masked in the attention.
Both take `block_table` [B, max_blocks] for a paged cache (bf16/fp32 caches): k (the cache) is then a pool
[blocks, PAGE, ...] and key (cache row) n of request b is row n % PAGE of its block table[b, n // PAGE]; T is
max_blocks * PAGE.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dsgraph.errors import InputError, ShapeError

from .common import check_device, check_float, dot_precision
from .flash_attention import check_block_table


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


@triton.jit
def _kv_len(lens_ptr, b, T, HAS_LENS: tl.constexpr):
    """Request b's cache length: T, or its device-side length (clamped: never read past the buffer)."""
    if HAS_LENS:
        return tl.minimum(tl.load(lens_ptr + b).to(tl.int32), T)
    return T


@triton.jit
def _row_ptrs(base_ptr, table_ptr, b, rows, ok, stride_b, stride_t, stride_tb, PAGE: tl.constexpr):
    """Pointers to rows `rows` of request b: its own [T, ...] rows, or (PAGE > 0) the pool's through its blocks."""
    if PAGE > 0:
        page = tl.load(table_ptr + b * stride_tb + rows // PAGE, mask=ok, other=0).to(tl.int64)
        return base_ptr + (page * PAGE + rows % PAGE)[:, None] * stride_t
    return base_ptr + b * stride_b + rows.to(tl.int64)[:, None] * stride_t


@triton.jit
def _indexer_logits_kernel(
    q_ptr, k_ptr, w_ptr, qs_ptr, ks_ptr, lens_ptr, table_ptr, out_ptr, S, T, stride_pb,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_wb, stride_ws, stride_wh,
    stride_sb, stride_ss, stride_sh,
    stride_tb, stride_tt,
    stride_ob, stride_os, stride_ot,
    scale,
    HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, FP8: tl.constexpr, PRECISION: tl.constexpr, PAGE: tl.constexpr,
):
    row = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kv_len = _kv_len(lens_ptr, b, T, HAS_LENS)
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok, d_ok, t_ok = offs_h < HEADS, offs_d < DIM, offs_t < T
    q = tl.load(q_ptr + b * stride_qb + row * stride_qs + offs_h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    t_in = t_ok & (offs_t < kv_len)
    k_rows = _row_ptrs(k_ptr, table_ptr, b, offs_t, t_in, stride_kb, stride_kt, stride_pb, PAGE)
    k = tl.load(k_rows + offs_d[None, :] * stride_kd, mask=t_in[:, None] & d_ok[None, :], other=0.0)
    w = tl.load(w_ptr + b * stride_wb + row * stride_ws + offs_h * stride_wh, mask=h_ok, other=0.0).to(tl.float32)
    if FP8:   # e4m3 x e4m3 -> fp32 on the tensor cores; the per-token scales come after the ReLU
        scores = tl.maximum(tl.dot(q, tl.trans(k)), 0.0)                              # [BLOCK_H, BLOCK_T]
        w = w * tl.load(qs_ptr + b * stride_sb + row * stride_ss + offs_h * stride_sh, mask=h_ok, other=0.0)
        k_scale = tl.load(ks_ptr + b * stride_tb + offs_t * stride_tt, mask=t_ok, other=0.0)
        logits = tl.sum(scores * w[:, None], axis=0) * k_scale * scale
    else:
        scores = tl.maximum(tl.dot(q, tl.trans(k), input_precision=PRECISION), 0.0)    # [BLOCK_H, BLOCK_T]
        logits = tl.sum(scores * w[:, None], axis=0) * scale
    visible = offs_t < kv_len
    if CAUSAL:
        visible = visible & (offs_t <= kv_len - S + row)
    logits = tl.where(visible, logits, float("-inf"))
    tl.store(out_ptr + b * stride_ob + row * stride_os + offs_t * stride_ot, logits, mask=t_ok)


def indexer_logits(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float, causal: bool = True,
                   kv_lens: torch.Tensor | None = None, q_scale: torch.Tensor | None = None,
                   k_scale: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                   check_table: bool = True) -> torch.Tensor:
    """q [B,S,H,D], k [B,T,D], weights [B,S,H] -> fp32 [B,S,T] (see dsgraph/ops/dsa.py); kv_lens, block_table (k
    then a pool [blocks, PAGE, D], kv_lens required): see above. FP8 (contiguous k only): q and k float8_e4m3fn
    with fp32 scales q_scale [B,S,H] and k_scale [B,T] (one per row of D values). check_table=False: the caller
    has checked the block ids on the host (the check here syncs the device)."""
    fp8 = q_scale is not None or k_scale is not None
    if fp8:
        _check_fp8("indexer_logits", (q, q_scale), (k, k_scale))
        dtype = torch.float32
    else:
        dtype = check_float("indexer_logits", q=q, k=k)
    b, s, h, d = q.shape
    t = k.shape[1]
    paged = block_table is not None
    t = _paged_length("indexer_logits", block_table, k, kv_lens, b, fp8, check_table) if paged else t
    if (k.shape[2] != d if paged else k.shape != (b, t, d)) or weights.shape != (b, s, h) or \
            fp8 and (q_scale.shape != (b, s, h) or k_scale.shape != (b, t)):
        raise ShapeError(f"indexer_logits: q {tuple(q.shape)}, k {tuple(k.shape)}, weights {tuple(weights.shape)}"
                         + (f", q_scale {tuple(q_scale.shape)}, k_scale {tuple(k_scale.shape)}" if fp8 else "")
                         + " must be [B,S,H,D], [B,T,D], [B,S,H]" + (", [B,S,H], [B,T]" if fp8 else ""))
    out = torch.empty((b, s, t), dtype=torch.float32, device=q.device)
    if out.numel():
        block_t = min(64, _pow2(t))
        qs, ks = (q_scale, k_scale) if fp8 else (out, out[:, 0])
        _indexer_logits_kernel[(s, b, triton.cdiv(t, block_t))](
            q, k, weights, qs, ks, out if kv_lens is None else kv_lens, block_table if paged else out, out, s, t,
            block_table.stride(0) if paged else 0, *q.stride(), *k.stride(),
            *weights.stride(), *qs.stride(), *ks.stride(), *out.stride(), scale, HEADS=h, DIM=d,
            BLOCK_H=_pow2(h), BLOCK_D=_pow2(d, 32 if fp8 else 16),   # an e4m3 dot's K is at least 32
            BLOCK_T=block_t, CAUSAL=causal, HAS_LENS=kv_lens is not None, FP8=fp8, PRECISION=dot_precision(dtype),
            PAGE=k.shape[1] if paged else 0)
    return out


def _paged_length(what: str, block_table, pool, kv_lens, b: int, fp8: bool, ids: bool) -> int:
    """The cache length T a block table spans over `pool` [blocks, PAGE, ...], the table checked; the FP8 caches
    are read contiguous only."""
    if fp8:
        raise InputError(f"{what}: the FP8 cache is read contiguous, not through a block table")
    check_block_table(what, block_table, (pool,), kv_lens, b, ids)
    return block_table.shape[1] * pool.shape[1]


def _check_fp8(what: str, *pairs) -> None:
    """(values, scales) pairs: e4m3 values with fp32 scales, all on one device."""
    for name, (x, x_scale) in zip(("q", "k"), pairs):
        if x.dtype != torch.float8_e4m3fn or x_scale is None or x_scale.dtype != torch.float32:
            raise InputError(f"{what}: the FP8 path takes float8_e4m3fn {name} with float32 {name}_scale, got "
                             f"{x.dtype} and {None if x_scale is None else x_scale.dtype}; pass both scales")
        if x.device != pairs[0][0].device or x_scale.device != x.device:
            raise InputError(f"{what}: FP8 {name} and its scale must be on {pairs[0][0].device}")
    check_device(what, pairs[0][0])


@triton.jit
def _sparse_mla_kernel(
    q_ptr, qr_ptr, c_ptr, cr_ptr, cs_ptr, idx_ptr, lens_ptr, table_ptr, out_ptr, S, T, K, H, stride_pb,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_rb, stride_rs, stride_rh, stride_rd,
    stride_cb, stride_ct, stride_cd,
    stride_crb, stride_crt, stride_crd,
    stride_csb, stride_cst, stride_csg,
    stride_ib, stride_is, stride_ik,
    stride_ob, stride_os, stride_oh, stride_od,
    qk_scale,
    HEAD_C: tl.constexpr, HEAD_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr,
    FP8_GROUP: tl.constexpr, PRECISION: tl.constexpr, PAGE: tl.constexpr,
):
    row = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kv_len = _kv_len(lens_ptr, b, T, HAS_LENS)
    offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c, offs_r = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    h_ok, c_ok, r_ok = offs_h < H, offs_c < HEAD_C, offs_r < HEAD_R
    q_rows = q_ptr + b * stride_qb + row * stride_qs + offs_h[:, None] * stride_qh
    q_c = tl.load(q_rows + offs_c[None, :] * stride_qd, mask=h_ok[:, None] & c_ok[None, :], other=0.0)
    r_rows = qr_ptr + b * stride_rb + row * stride_rs + offs_h[:, None] * stride_rh
    q_r = tl.load(r_rows + offs_r[None, :] * stride_rd, mask=h_ok[:, None] & r_ok[None, :], other=0.0)
    limit = kv_len - S + row
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        slots = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + b * stride_ib + row * stride_is + slots * stride_ik, mask=slots < K, other=-1)
        ok = (idx >= 0) & (idx < kv_len)
        if CAUSAL:
            ok = ok & (idx <= limit)
        pos = tl.where(ok, idx, 0)
        kc = tl.load(_row_ptrs(c_ptr, table_ptr, b, pos, ok, stride_cb, stride_ct, stride_pb, PAGE)
                     + offs_c[None, :] * stride_cd, mask=ok[:, None] & c_ok[None, :], other=0.0)
        if FP8_GROUP:   # e4m3 rows times their group scales, in registers
            sc = tl.load(_row_ptrs(cs_ptr, table_ptr, b, pos, ok, stride_csb, stride_cst, stride_pb, PAGE)
                         + (offs_c[None, :] // FP8_GROUP) * stride_csg, mask=ok[:, None] & c_ok[None, :], other=0.0)
            kc = (kc.to(tl.float32) * sc).to(q_c.dtype)
        kr = tl.load(_row_ptrs(cr_ptr, table_ptr, b, pos, ok, stride_crb, stride_crt, stride_pb, PAGE)
                     + offs_r[None, :] * stride_crd, mask=ok[:, None] & r_ok[None, :], other=0.0)
        qk = tl.dot(q_c, tl.trans(kc), input_precision=PRECISION)
        qk = tl.dot(q_r, tl.trans(kr), qk, input_precision=PRECISION) * qk_scale
        qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of empty slots leaves the row at zero
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(kc.dtype), kc, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = out_ptr + b * stride_ob + row * stride_os + offs_h[:, None] * stride_oh + offs_c[None, :] * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & c_ok[None, :])


def sparse_mla(q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, scale: float, kv_lora_rank: int,
               causal: bool = True, kv_lens: torch.Tensor | None = None, q_rope: torch.Tensor | None = None,
               cache_scale: torch.Tensor | None = None, cache_rope: torch.Tensor | None = None,
               block_table: torch.Tensor | None = None, check_table: bool = True) -> torch.Tensor:
    """q [B,S,H,C+R], cache [B,T,C+R], indices int [B,S,K] -> [B,S,H,C] (see dsgraph/ops/dsa.py); with q_rope
    [B,S,H,R], q is the latent part [B,S,H,C] alone (the two inputs of absorb_mla's concat, read where they lie).
    FP8 cache: cache the e4m3 NoPE rows [B,T,C], cache_scale fp32 [B,T,C/group], cache_rope [B,T,R] (q's dtype).
    block_table (bf16/fp32 cache): cache is a pool [blocks, PAGE, C+R] (kv_lens required), see above;
    check_table as for indexer_logits."""
    fp8 = cache_scale is not None or cache_rope is not None
    dtype = check_float("sparse_mla", q=q, **({"cache_rope": cache_rope} if fp8 else {"cache": cache}))
    if q_rope is None:
        q_rope = q[..., kv_lora_rank:]
    b, s, h = q.shape[:3]
    width = kv_lora_rank + q_rope.shape[-1]
    t, n = cache.shape[1], indices.shape[-1]
    paged = block_table is not None
    t = _paged_length("sparse_mla", block_table, cache, kv_lens, b, fp8, check_table) if paged else t
    if fp8:
        group = _fp8_group(cache, cache_scale, cache_rope, (b, t, kv_lora_rank), width - kv_lora_rank)
    elif (cache.shape[2] != width) if paged else cache.shape != (b, t, width):
        raise ShapeError(f"sparse_mla: cache {tuple(cache.shape)} must be [B,T,C+R] = {(b, t, width)}")
    if indices.shape[:2] != (b, s) or q_rope.shape[:3] != (b, s, h) \
            or q.shape[-1] not in (kv_lora_rank, width) or not 0 < kv_lora_rank < width:
        raise ShapeError(f"sparse_mla: q {tuple(q.shape)}, cache {tuple(cache.shape)}, indices "
                         f"{tuple(indices.shape)} must be [B,S,H,C+R], [B,T,C+R], [B,S,K] with 0 < C={kv_lora_rank} "
                         "< C+R")
    rope = cache_rope if fp8 else cache[..., kv_lora_rank:]
    scales = cache_scale if fp8 else cache
    out = torch.empty((b, s, h, kv_lora_rank), dtype=q.dtype, device=q.device)
    if out.numel():
        block_h, block_k = sparse_mla_blocks(h, n, fp8)
        _sparse_mla_kernel[(s, b, triton.cdiv(h, block_h))](
            q, q_rope, cache, rope, scales, indices, out if kv_lens is None else kv_lens,
            block_table if paged else out, out, s, t, n, h, block_table.stride(0) if paged else 0, *q.stride(),
            *q_rope.stride(), *cache.stride(), *rope.stride(), *scales.stride(), *indices.stride(),
            *out.stride(), scale, HEAD_C=kv_lora_rank, HEAD_R=width - kv_lora_rank, BLOCK_C=_pow2(kv_lora_rank),
            BLOCK_R=_pow2(width - kv_lora_rank), BLOCK_H=block_h, BLOCK_K=block_k, CAUSAL=causal,
            HAS_LENS=kv_lens is not None, FP8_GROUP=group if fp8 else 0, PRECISION=dot_precision(dtype),
            PAGE=cache.shape[1] if paged else 0)
    return out


def sparse_mla_blocks(h: int, k: int, fp8: bool) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_K) of the sparse MLA launch. The FP8 cache's tiles take 32 slots, not 64: at C = 512 its
    [BLOCK_K, C] e4m3 rows, their fp32 group scales gathered per column and the bf16 dequantised copy the dots
    read need 279 KB of shared memory at 64 (Triton 3.9; 321 KB on 3.6) against an H200's 227 KB, 176 KB at 32
    (tests/test_triton_dsa.py compiles it for sm_90 and checks)."""
    return min(64, _pow2(h)), min(32 if fp8 else 64, _pow2(k))


def sparse_mla_shared_bytes(fp8: bool, h: int = 128, k: int = 2048, c: int = 512, r: int = 64) -> int:
    """Shared memory of the launch sparse_mla makes in bf16 (default: V3.2's full size), compiled for sm_90 without
    a GPU (not under the interpreter, whose kernels are not JIT functions)."""
    block_h, block_k = sparse_mla_blocks(h, k, fp8)
    consts = {"HEAD_C": c, "HEAD_R": r, "BLOCK_C": _pow2(c), "BLOCK_R": _pow2(r), "BLOCK_H": block_h,
              "BLOCK_K": block_k, "CAUSAL": True, "HAS_LENS": True, "FP8_GROUP": 128 if fp8 else 0,
              "PRECISION": "tf32", "PAGE": 0}
    ptrs = {"c_ptr": "*fp8e4nv" if fp8 else "*bf16", "cs_ptr": "*fp32" if fp8 else "*bf16", "idx_ptr": "*i32",
            "lens_ptr": "*i32"}
    names = _sparse_mla_kernel.arg_names
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "*bf16") if a.endswith("_ptr") else
           "fp32" if a == "qk_scale" else "i32" for a in names}
    src = ASTSource(_sparse_mla_kernel, sig, constexprs={(names.index(a),): v for a, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).metadata.shared


def _fp8_group(rows, scales, rope, shape, r: int) -> int:
    """The FP8 latent cache's parts checked (kernel docstring); returns the values per scale."""
    b, t, c = shape
    if rows.dtype != torch.float8_e4m3fn or scales is None or scales.dtype != torch.float32 or rope is None:
        raise InputError(f"sparse_mla: the FP8 cache is float8_e4m3fn rows with float32 cache_scale and cache_rope, "
                         f"got {rows.dtype}, {None if scales is None else scales.dtype}, "
                         f"{None if rope is None else rope.dtype}")
    groups = scales.shape[-1] if scales.dim() == 3 else 0
    if rows.shape != shape or rope.shape != (b, t, r) or scales.shape != (b, t, groups) or not groups \
            or c % groups or rows.device != rope.device or scales.device != rope.device:
        raise ShapeError(f"sparse_mla: FP8 cache rows {tuple(rows.shape)}, scales {tuple(scales.shape)}, rope "
                         f"{tuple(rope.shape)} must be [B,T,C] = {shape}, [B,T,C/group], [B,T,R] = {(b, t, r)} on "
                         "one device")
    return c // groups
