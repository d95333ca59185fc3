"""DeepSeek Sparse Attention (V3.2) kernels: the lightning indexer's scores and sparse absorbed MLA over the rows it
selects (ops `indexer.logits` and `attention.mla_sparse_absorbed`, dsgraph/ops/dsa.py).

Indexer: one program per (query, BLOCK_T keys): q [H, D] @ k^T [D, BLOCK_T] on the tensor cores, ReLU, then the
weighted sum over heads as a [H] x [H, BLOCK_T] reduction -- the [B,S,H,T] score tensor is never written.

Sparse MLA: one program per (query, BLOCK_H heads). All heads of a query share its index list, so each [BLOCK_K,
C+R] tile of gathered latent rows is loaded once for BLOCK_H heads and serves as keys (all C+R columns) and values
(the first C). `-1` slots and slots past the query's causal horizon are masked; the softmax is the online one in
fp32. Prefill (S queries) and decode (S = 1) are the same launch; the work is O(S * K), not O(S * T).

Both take `kv_lens` [B] (the device-side lengths of a static-capacity CUDA-graph decode step): rows at or past a
request's length score -inf in the indexer, so the top-k never selects them, and are masked in the attention.
Both take `block_table` [B, max_blocks] for a paged cache: k (the cache) is then a pool [blocks, PAGE, ...] and key
(cache row) n of request b is row n % PAGE of its block table[b, n // PAGE]; T is max_blocks * PAGE.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsgraph.errors import ShapeError

from .common import check_float, dot_precision
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
    q_ptr, k_ptr, w_ptr, lens_ptr, table_ptr, out_ptr, S, T, stride_tb,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_wb, stride_ws, stride_wh,
    stride_ob, stride_os, stride_ot,
    scale,
    HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, PRECISION: tl.constexpr, PAGE: tl.constexpr,
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
    k_rows = _row_ptrs(k_ptr, table_ptr, b, offs_t, t_in, stride_kb, stride_kt, stride_tb, PAGE)
    k = tl.load(k_rows + offs_d[None, :] * stride_kd, mask=t_in[:, None] & d_ok[None, :], other=0.0)
    w = tl.load(w_ptr + b * stride_wb + row * stride_ws + offs_h * stride_wh, mask=h_ok, other=0.0).to(tl.float32)
    scores = tl.maximum(tl.dot(q, tl.trans(k), input_precision=PRECISION), 0.0)        # [BLOCK_H, BLOCK_T]
    logits = tl.sum(scores * w[:, None], axis=0) * scale
    visible = offs_t < kv_len
    if CAUSAL:
        visible = visible & (offs_t <= kv_len - S + row)
    logits = tl.where(visible, logits, float("-inf"))
    tl.store(out_ptr + b * stride_ob + row * stride_os + offs_t * stride_ot, logits, mask=t_ok)


def indexer_logits(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float, causal: bool = True,
                   kv_lens: torch.Tensor | None = None, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """q [B,S,H,D], k [B,T,D], weights [B,S,H] -> fp32 [B,S,T] (see dsgraph/ops/dsa.py); kv_lens, block_table (k
    then a pool [blocks, PAGE, D], kv_lens required): see above."""
    dtype = check_float("indexer_logits", q=q, k=k)
    b, s, h, d = q.shape
    t = k.shape[1]
    paged = block_table is not None
    if paged:
        check_block_table("indexer_logits", block_table, (k,), kv_lens, b)
        t = block_table.shape[1] * k.shape[1]
    if (k.shape[2] != d if paged else k.shape != (b, t, d)) or weights.shape != (b, s, h):
        raise ShapeError(f"indexer_logits: q {tuple(q.shape)}, k {tuple(k.shape)}, weights {tuple(weights.shape)} "
                         "must be [B,S,H,D], [B,T,D], [B,S,H]")
    out = torch.empty((b, s, t), dtype=torch.float32, device=q.device)
    if out.numel():
        block_t = min(64, _pow2(t))
        _indexer_logits_kernel[(s, b, triton.cdiv(t, block_t))](
            q, k, weights, out if kv_lens is None else kv_lens, block_table if paged else out, out, s, t,
            block_table.stride(0) if paged else 0, *q.stride(), *k.stride(),
            *weights.stride(), *out.stride(), scale, HEADS=h, DIM=d, BLOCK_H=_pow2(h), BLOCK_D=_pow2(d),
            BLOCK_T=block_t, CAUSAL=causal, HAS_LENS=kv_lens is not None, PRECISION=dot_precision(dtype),
            PAGE=k.shape[1] if paged else 0)
    return out


@triton.jit
def _sparse_mla_kernel(
    q_ptr, qr_ptr, c_ptr, idx_ptr, lens_ptr, table_ptr, out_ptr, S, T, K, H, stride_tb,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_rb, stride_rs, stride_rh, stride_rd,
    stride_cb, stride_ct, stride_cd,
    stride_ib, stride_is, stride_ik,
    stride_ob, stride_os, stride_oh, stride_od,
    qk_scale,
    HEAD_C: tl.constexpr, HEAD_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr,
    PRECISION: tl.constexpr, PAGE: tl.constexpr,
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
        rows = _row_ptrs(c_ptr, table_ptr, b, tl.where(ok, idx, 0), ok, stride_cb, stride_ct, stride_tb, PAGE)
        kc = tl.load(rows + offs_c[None, :] * stride_cd, mask=ok[:, None] & c_ok[None, :], other=0.0)
        kr = tl.load(rows + (HEAD_C + offs_r[None, :]) * stride_cd, mask=ok[:, None] & r_ok[None, :], other=0.0)
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
               block_table: torch.Tensor | None = None) -> torch.Tensor:
    """q [B,S,H,C+R], cache [B,T,C+R], indices int [B,S,K] -> [B,S,H,C] (see dsgraph/ops/dsa.py); with q_rope
    [B,S,H,R], q is the latent part [B,S,H,C] alone (the two inputs of absorb_mla's concat, read where they lie).
    block_table: cache is a pool [blocks, PAGE, C+R] (kv_lens required), see above."""
    dtype = check_float("sparse_mla", q=q, cache=cache)
    if q_rope is None:
        q_rope = q[..., kv_lora_rank:]
    b, s, h = q.shape[:3]
    width = kv_lora_rank + q_rope.shape[-1]
    t, n = cache.shape[1], indices.shape[-1]
    paged = block_table is not None
    if paged:
        check_block_table("sparse_mla", block_table, (cache,), kv_lens, b)
        t = block_table.shape[1] * cache.shape[1]
    bad_cache = cache.shape[2] != width if paged else cache.shape != (b, t, width)
    if bad_cache or indices.shape[:2] != (b, s) or q_rope.shape[:3] != (b, s, h) \
            or q.shape[-1] not in (kv_lora_rank, width) or not 0 < kv_lora_rank < width:
        raise ShapeError(f"sparse_mla: q {tuple(q.shape)}, cache {tuple(cache.shape)}, indices "
                         f"{tuple(indices.shape)} must be [B,S,H,C+R], [B,T,C+R], [B,S,K] with 0 < C={kv_lora_rank} "
                         "< C+R")
    out = torch.empty((b, s, h, kv_lora_rank), dtype=q.dtype, device=q.device)
    if out.numel():
        block_h = min(64, _pow2(h))
        _sparse_mla_kernel[(s, b, triton.cdiv(h, block_h))](
            q, q_rope, cache, indices, out if kv_lens is None else kv_lens, block_table if paged else out, out, s, t,
            n, h, block_table.stride(0) if paged else 0, *q.stride(),
            *q_rope.stride(), *cache.stride(), *indices.stride(), *out.stride(), scale,
            HEAD_C=kv_lora_rank, HEAD_R=width - kv_lora_rank, BLOCK_C=_pow2(kv_lora_rank),
            BLOCK_R=_pow2(width - kv_lora_rank), BLOCK_H=block_h, BLOCK_K=min(64, _pow2(n)), CAUSAL=causal,
            HAS_LENS=kv_lens is not None, PRECISION=dot_precision(dtype), PAGE=cache.shape[1] if paged else 0)
    return out
