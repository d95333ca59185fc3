"""Absorbed MLA attention over the latent cache (op `attention.mla_absorbed`), split-KV flash-decoding.

q [B,S,H,C+R] (q_nope @ W_UK | q_rope; or the two parts as separate tensors), cache [B,T,C+R] shared by every
head, values = cache[..., :C], out [B,S,H,C]. Causal with the query block at the end of each request's cache:
with valid length L_b (`cache_lens[b]`, default T) query s sits at position L_b - S + s; cache rows at or beyond
L_b are ignored.

Why this shape: all heads read the same cache row, so one program takes BLOCK_H query rows and loads each
[BLOCK_N, C+R] cache tile once for all of them. The scores are [BLOCK_H x C] @ [C x BLOCK_N] plus the rope
part [BLOCK_H x R] @ [R x BLOCK_N]; the values reuse the same tile's first C columns
([BLOCK_H x BLOCK_N] @ [BLOCK_N x C]), so the cache is read once per row block, never twice for K and V.

Query rows are the flattened (query position, head) pairs m = s * H + h, each with its own causal limit. So
decode (S = 1), MTP verification (S = k+1) and chunked prefill against a cache (S large) are all this one
kernel: the grid covers ceil(S*H / BLOCK_H) row blocks, and each block stops at the last key its last row
can see. (Prefill without a cache uses `flash_attention` on the decompressed heads instead.)

Split-KV: each request's visible keys are cut into NUM_SPLITS partitions handled by separate programs, each
writing its normalised partial output and log-sum-exp (base 2); `_mla_reduce_kernel` merges them. This is
what fills the GPU at batch 1. NUM_SPLITS == 1 writes the output directly, with no partial buffers.

On Hopper, one-token decode at batches that fill the GPU has a second kernel, `mla_decode_gluon` (warp-specialised,
each warpgroup computing the whole score tile); it is one more candidate config (`MLAConfig.kernel == "gluon"`),
the default where one split would be in a CUDA-graph capture, so the tuner and the disk cache choose between the
two like any tiles.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from dsgraph.errors import InputError, ShapeError

from ..autotune import cached, graph_ms, pick
from .flash_attention import LOG2E, check_block_table, check_tensors, dot_precision, interpreting
from .mla_config import MLAConfig  # noqa: F401  (re-exported: the launch choices)

try:  # the Hopper Gluon kernel needs a Triton with Gluon and its Hopper ops; without, split-KV serves every call
    from . import mla_decode_gluon as gluon_kernel
    NO_GLUON = None
except ImportError as e:
    gluon_kernel, NO_GLUON = None, f"this Triton has no Gluon Hopper ops ({e})"


@triton.jit
def _mla_decode_kernel(
    q_ptr, qr_ptr, cache_ptr, lens_ptr, table_ptr, out_ptr, po_ptr, plse_ptr, M, S, H, T, stride_tb,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_rb, stride_rs, stride_rh, stride_rd,
    stride_cb, stride_ct, stride_cd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_pb, stride_pm, stride_ps,
    qk_scale,
    HEAD_C: tl.constexpr, HEAD_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    kv_len = T
    if HAS_LENS:
        kv_len = tl.minimum(tl.load(lens_ptr + b).to(tl.int32), T)  # clamp: never read past the buffer

    offs_m = pid_m * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = offs_m < M
    s_row = offs_m // H
    h_row = offs_m % H
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok = offs_c < HEAD_C
    r_ok = offs_r < HEAD_R
    q_rows = q_ptr + b * stride_qb + s_row[:, None] * stride_qs + h_row[:, None] * stride_qh
    q_c = tl.load(q_rows + offs_c[None, :] * stride_qd, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
    r_rows = qr_ptr + b * stride_rb + s_row[:, None] * stride_rs + h_row[:, None] * stride_rh
    q_r = tl.load(r_rows + offs_r[None, :] * stride_rd, mask=row_ok[:, None] & r_ok[None, :], other=0.0)

    kv_end = kv_len
    if CAUSAL:
        last_s = tl.minimum(pid_m * BLOCK_H + BLOCK_H - 1, M - 1) // H
        kv_end = tl.minimum(kv_len, kv_len - S + last_s + 1)  # the block's last row sees keys < kv_end
        limit = kv_len - S + s_row  # each row sees keys <= limit
    kv_end = tl.maximum(kv_end, 0)
    chunk = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, kv_end)

    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    c_rows = cache_ptr + b * stride_cb
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        if PAGE > 0:  # paged: row n of request b is row n % PAGE of block table[b, n // PAGE] of the pool
            page = tl.load(table_ptr + b * stride_tb + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
            kv_ptrs = cache_ptr + (page * PAGE + offs_n % PAGE)[:, None] * stride_ct
        else:
            kv_ptrs = c_rows + offs_n[:, None] * stride_ct
        kc = tl.load(kv_ptrs + offs_c[None, :] * stride_cd, mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        kr = tl.load(kv_ptrs + (HEAD_C + offs_r[None, :]) * stride_cd, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        qk = tl.dot(q_c, tl.trans(kc), input_precision=PRECISION)
        qk = tl.dot(q_r, tl.trans(kr), qk, input_precision=PRECISION)
        qk = qk * qk_scale
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= limit[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet stay at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(kc.dtype), kc, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    mask = row_ok[:, None] & c_ok[None, :]
    if NUM_SPLITS == 1:
        o_ptrs = (out_ptr + b * stride_ob + s_row[:, None] * stride_os + h_row[:, None] * stride_oh
                  + offs_c[None, :] * stride_od)
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        part = b * stride_pb + offs_m * stride_pm + split * stride_ps
        tl.store(po_ptr + part[:, None] * HEAD_C + offs_c[None, :], out, mask=mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))  # empty partitions weigh nothing
        tl.store(plse_ptr + part, lse, mask=row_ok)


@triton.jit
def _mla_reduce_kernel(
    po_ptr, plse_ptr, out_ptr, H,
    stride_pb, stride_pm, stride_ps,
    stride_ob, stride_os, stride_oh, stride_od,
    HEAD_C: tl.constexpr, BLOCK_C: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    """Merge the partitions of one query row's BLOCK_C-wide slice: out = sum_i 2^(lse_i - max) * o_i /
    sum_i 2^(lse_i - max). Slicing C spreads a batch-1 step's few rows over more SMs."""
    m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_ok = offs_s < NUM_SPLITS
    c_ok = offs_c < HEAD_C
    part = b * stride_pb + m * stride_pm + offs_s * stride_ps
    lse = tl.load(plse_ptr + part, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    total = tl.sum(w, 0)
    o = tl.load(po_ptr + part[:, None] * HEAD_C + offs_c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    o_ptrs = out_ptr + b * stride_ob + (m // H) * stride_os + (m % H) * stride_oh + offs_c * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=c_ok)


# ----------------------------------------------------------------------------------------------------- configs

REDUCE_SLICE = 128  # latent columns per reduce program
MAX_SPLITS = 128  # partitions per request the tuner may try (each at least 32 keys)


def mla_num_splits(batch: int, rows: int, kv_len: int, sm_count: int) -> int:
    """Partitions per request: enough programs for about two waves, each partition at least 128 keys.

    Above ~0.8 waves of 64-row blocks the partial-output traffic (fp32 [rows, splits, C]) costs more than the
    idle SMs (H100, 128 heads, batch 64: 1 split 280 us, 2 splits 302 us), so large batches take one split.
    """
    programs = batch * triton.cdiv(rows, 64)
    if programs >= 0.8 * sm_count:
        return 1
    return max(1, min(2 * sm_count // programs, kv_len // 128, 64))


def mla_candidates(batch: int, rows: int, kv_len: int, sm_count: int, gluon: bool = False,
                   graphed: bool = False) -> list[MLAConfig]:
    """Launch configs for a shape, the default first; `tune=True` times them all. Keyed on the shape because the
    split count decides the grid and the partial buffers, which triton.autotune cannot vary. gluon: the call fits
    `mla_decode_gluon`; its config leads where one split would and the launch is being captured in a CUDA graph
    (graphed), else it comes last.

    Tiles measured on H100 (bf16, C=512, R=64, cache 4096; benchmarks/attention_gpu.py): one split with
    64-row blocks (BLOCK_H=64 fills a wgmma tile, its fp32 [64 x 512] accumulator wants 8 warps) for large
    batches; narrow 16-row blocks over several splits otherwise. One small tile on the interpreter, which times nothing.
    """
    splits = mla_num_splits(batch, rows, kv_len, sm_count)
    if interpreting():
        return [MLAConfig(16, 16, splits, 1, 1)]
    if splits == 1:  # 128 heads, batch 64: 280 us; the next best tiles 330 us
        tiles = [(64, 64, 8, 2), (64, 32, 8, 3), (32, 64, 4, 2)]
    elif rows <= 16:  # 16 heads, batch 64, 4 splits: 124 us (plain launches; 64-key tiles 140 us)
        tiles = [(16, 16, 4, 3), (16, 64, 4, 2), (16, 32, 4, 3)]
    else:  # 128 heads, batch 1, 32 splits: 22 us (plain launches), 16 us under a CUDA graph
        tiles = [(16, 64, 4, 2), (32, 64, 4, 3), (16, 16, 4, 3)]
    widest = max(16, triton.next_power_of_2(rows))
    tiles = [t for t in tiles if t[0] <= widest] or [(16, 64, 4, 2)]
    if splits > 1:  # also finer partitions (down to 32 keys): batch 1's few rows leave SMs idle at 128 keys
        most = max(splits, min(MAX_SPLITS, kv_len // 32))
        split_opts = [splits] + sorted({max(1, splits // 2), min(most, splits * 2), min(most, splits * 4)} - {splits})
    else:
        split_opts = [1, 2]
    cands = [MLAConfig(bh, bn, sp, w, st) for sp in split_opts for bh, bn, w, st in tiles]
    if gluon:  # 128 heads, batch 64, graph replay: 175 us against the best tiles' 272. A plain launch of it spends
        # ~85 us more on the host (4 TMA descriptors), which a graph replay does not repeat
        gluon_cfg = gluon_kernel.GLUON_CONFIG
        cands = [gluon_cfg] + cands if splits == 1 and graphed else cands + [gluon_cfg]
    return cands


def tune_key(batch: int, rows: int, kv_len: int, head_c: int, head_r: int, dtype: torch.dtype, causal: bool,
             has_lens: bool, num_splits: int | None, gluon: bool) -> tuple:
    """Cache lengths are bucketed to powers of two so a growing cache does not re-tune every step;
    num_splits is the caller's override (None when the candidates choose); gluon: the Gluon kernel was a candidate."""
    return (batch, rows, triton.next_power_of_2(kv_len), head_c, head_r, str(dtype), causal, has_lens, num_splits,
            gluon)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


# ----------------------------------------------------------------------------------------------------- host wrapper

def _check(q, cache, kv_lora_rank, cache_lens, q_rope, paged: bool = False):
    """Shapes, dtypes and devices; returns the query's two parts (latent [B,S,H,C], rope [B,S,H,R])."""
    check_tensors("mla_absorbed", q=q, cache=cache, **({} if q_rope is None else {"q_rope": q_rope}))
    whole = q_rope is None
    if q.dim() != 4 or cache.dim() != 3 or not (whole or q_rope.dim() == 4):
        raise ShapeError(f"mla_absorbed: q must be [B,S,H,C+R] (or [B,S,H,C] with q_rope [B,S,H,R]) and cache "
                         f"[B,T,C+R], got q {tuple(q.shape)}, cache {tuple(cache.shape)}"
                         + ("" if whole else f", q_rope {tuple(q_rope.shape)}"))
    b, width = q.shape[0], q.shape[3] + (0 if whole else q_rope.shape[3])
    if not whole and (q_rope.shape[:3] != q.shape[:3] or q.shape[3] != kv_lora_rank):
        raise ShapeError(f"mla_absorbed: q {tuple(q.shape)} must be [B,S,H,{kv_lora_rank}] and q_rope "
                         f"{tuple(q_rope.shape)} share its B,S,H")
    if (cache.shape[0] != b and not paged) or cache.shape[2] != width:
        raise ShapeError(f"mla_absorbed: cache {tuple(cache.shape)} does not match q {tuple(q.shape)} "
                         "(batch and C+R width must agree)")
    if not 0 < kv_lora_rank < width:
        raise ShapeError(f"mla_absorbed: kv_lora_rank {kv_lora_rank} must lie in (0, {width})")
    if cache_lens is not None:
        if not isinstance(cache_lens, torch.Tensor) or cache_lens.dtype not in (torch.int32, torch.int64):
            raise InputError("mla_absorbed: cache_lens must be an int32 or int64 tensor")
        if tuple(cache_lens.shape) != (b,) or cache_lens.device != q.device:
            raise InputError(f"mla_absorbed: cache_lens must be [{b}] on {q.device}, got {tuple(cache_lens.shape)} "
                             f"on {cache_lens.device}")
    return (q[..., :kv_lora_rank], q[..., kv_lora_rank:]) if whole else (q, q_rope)


def hopper(device) -> bool:
    """Whether `device` is an sm_90 GPU, the one `mla_decode_gluon` is built for."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def gluon_unfit(qc, qr, cache, cache_lens, finite_tail: bool) -> str | None:
    """None if `mla_decode_gluon` can run this call, else why not."""
    if not hopper(qc.device):
        return "needs an sm_90 (Hopper) GPU"
    if gluon_kernel is None:
        return NO_GLUON
    return gluon_kernel.fits(qc, qr, cache, cache_lens, finite_tail)


def _launch(qc, qr, cache, scale, cache_lens, causal, cfg: MLAConfig, block_table=None) -> torch.Tensor:
    if cfg.kernel == "gluon":  # one query row, so causal masking is the length mask
        return gluon_kernel.mla_decode_gluon(qc, qr, cache, scale, cache_lens)
    (b, s, h, c), r = qc.shape, qr.shape[3]
    rows, splits = s * h, cfg.num_splits
    out = torch.empty((b, s, h, c), dtype=qc.dtype, device=qc.device)
    if splits > 1:
        po = torch.empty((b, rows, splits, c), dtype=torch.float32, device=qc.device)
        plse = torch.empty((b, rows, splits), dtype=torch.float32, device=qc.device)
    else:
        po = plse = out  # unused: the kernel writes `out` directly
    p_strides = (rows * splits, splits, 1)  # in units of C-rows for po, of scalars for plse
    block_c = max(16, triton.next_power_of_2(c))
    paged = block_table is not None
    t_len = block_table.shape[1] * cache.shape[1] if paged else cache.shape[1]
    _mla_decode_kernel[(triton.cdiv(rows, cfg.block_h), b, splits)](
        qc, qr, cache, cache_lens if cache_lens is not None else out, block_table if paged else out, out, po, plse,
        rows, s, h, t_len, block_table.stride(0) if paged else 0,
        *qc.stride(), *qr.stride(), *cache.stride(), *out.stride(), *p_strides, scale * LOG2E,
        HEAD_C=c, HEAD_R=r, BLOCK_C=block_c, BLOCK_R=max(16, triton.next_power_of_2(r)),
        HAS_LENS=cache_lens is not None, CAUSAL=bool(causal), NUM_SPLITS=splits, PRECISION=dot_precision(qc.dtype),
        BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, PAGE=cache.shape[1] if paged else 0, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    if splits > 1:
        slice_c = min(block_c, REDUCE_SLICE)
        _mla_reduce_kernel[(rows, b, triton.cdiv(c, slice_c))](
            po, plse, out, h, *p_strides, *out.stride(), HEAD_C=c, BLOCK_C=slice_c, NUM_SPLITS=splits,
            BLOCK_SPLITS=triton.next_power_of_2(splits), num_warps=4 if slice_c * splits >= 4096 else 1)
    return out


def mla_absorbed(q: torch.Tensor, cache: torch.Tensor, scale: float, kv_lora_rank: int,
                 cache_lens: torch.Tensor | None = None, causal: bool = True,
                 config: MLAConfig | None = None, num_splits: int | None = None, tune: bool = False,
                 q_rope: torch.Tensor | None = None, finite_tail: bool = False,
                 block_table: torch.Tensor | None = None, check_table: bool = True) -> torch.Tensor:
    """`attention.mla_absorbed` over a latent cache; returns [B, S, H, kv_lora_rank] in q's dtype.

    q is [B,S,H,C+R], or only its latent part [B,S,H,C] with the rope part passed as q_rope [B,S,H,R]: the kernel
    reads the two where they lie, so a caller holding them apart needs no concat. cache_lens: optional [B]
    int32/int64 valid lengths (values above T are clamped to T; rows that see no key, e.g. L_b < S, come out as
    zeros). finite_tail: the caller vouches that cache rows at or past cache_lens hold finite values (true of
    the runtime's zero-initialised decode buffers), which the Gluon kernel needs. The launch is `config` if
    given, else the tuned winner for this shape if one is known (this process or the disk cache, `autotune`),
    else the first of `mla_candidates` (with `num_splits` overriding its split count). tune=True times the
    candidates on first use per shape (not during a CUDA-graph capture, which gets the first candidate).
    block_table: the paged cache. cache is then a pool [num_blocks, PAGE, C+R] and block_table [B, max_blocks]
    (int32/int64) names each request's blocks in order; cache_lens is required (the blocks' tail rows past it
    are never read); check_table=False: the caller has checked its block ids on the host (the check here syncs
    the device).
    """
    qc, qr = _check(q, cache, kv_lora_rank, cache_lens, q_rope, block_table is not None)
    if block_table is not None:
        check_block_table("mla_absorbed", block_table, (cache,), cache_lens, q.shape[0], check_table)
    b, s, h, _ = q.shape
    if qc.numel() == 0:
        return torch.empty((b, s, h, kv_lora_rank), dtype=q.dtype, device=q.device)
    unfit = "a paged cache" if block_table is not None else \
        gluon_unfit(qc, qr, cache, cache_lens, finite_tail) if num_splits in (None, 1) else "num_splits > 1"
    if config is None:
        rows, t_len = s * h, cache.shape[1] * (1 if block_table is None else block_table.shape[1])
        graphed = q.is_cuda and torch.cuda.is_current_stream_capturing()
        cands = mla_candidates(b, rows, t_len, _sm_count(q.device), gluon=unfit is None, graphed=graphed)
        if num_splits is not None:
            cands = [dataclasses.replace(c, num_splits=num_splits) for c in cands]
        key = tune_key(b, rows, t_len, kv_lora_rank, qr.shape[3], q.dtype, causal, cache_lens is not None,
                       num_splits, unfit is None) + (() if block_table is None else (("paged", cache.shape[1]),))
        run = lambda cfg: _launch(qc, qr, cache, scale, cache_lens, causal, cfg, block_table)
        cands = list(dict.fromkeys(cands))
        config = (pick("mla_decode", key, cands, run, timer=graph_ms) if tune
                  else cached("mla_decode", key, cands) or cands[0])
    if config.num_splits < 1:
        raise InputError(f"mla_absorbed: num_splits must be >= 1, got {config.num_splits}")
    if config.kernel == "gluon" and unfit is not None:
        raise InputError(f"mla_absorbed: the Gluon kernel cannot run this call: {unfit}")
    if config.kernel not in ("triton", "gluon"):
        raise InputError(f"mla_absorbed: MLAConfig.kernel must be 'triton' or 'gluon', got {config.kernel!r}")
    return _launch(qc, qr, cache, scale, cache_lens, causal, config, block_table)
