"""Flash attention for prefill (ops `attention.gqa` and `attention.mla`): causal, online softmax, tiles over keys.

q [B,S,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv] -> out [B,S,Hq,Dv] in q's dtype; Hq is a multiple of Hkv (GQA
groups read their kv head through `h // GROUP`), Dv may differ from D (naive MLA: D=192, Dv=128). Causal with
the query block at the end of the keys: query i sits at position T - S + i.

Head dims that are not a power of two are split, not padded: D = D1 + D2 with D1 the largest power of two <= D,
so 192 = 128 + 64 and 576 = 512 + 64 cost no wasted MACs; the scores are two accumulated dots. D2 (and Dv) are
padded to a power of two with masks.

Each program owns BLOCK_M query rows of one head and walks the keys in two phases: tiles every row sees in full
(no masks), then the tiles on the causal diagonal / ragged end (masked). Scores use exp2 with log2(e) folded
into the scale; accumulation is fp32.

Host-side helpers shared with `mla_decode` (device checks, interpreter detection) live here too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsgraph.errors import BackendUnavailable, InputError, ShapeError

LOG2E = 1.4426950408889634
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------- host helpers

def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_tensors(what: str, *, dots: bool = True, **tensors: torch.Tensor) -> torch.dtype:
    """Common input rules: torch tensors, one float dtype, one device the kernels can run on. Returns the dtype.
    `dots=False`: the kernel has no tl.dot, so bfloat16 is right on the interpreter too."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise InputError(f"{what}: {name} has dtype {t.dtype}; the kernel takes float16, bfloat16 or float32")
        if t.dtype != first.dtype or t.device != first.device:
            raise InputError(f"{what}: {name} is {t.dtype} on {t.device} but {first_name} is {first.dtype} on "
                             f"{first.device}; cast/move them to one dtype and device")
    if first.device.type == "cpu":
        if not interpreting():
            raise BackendUnavailable(f"{what}: CPU tensors need Triton's interpreter; set TRITON_INTERPRET=1 "
                                     "before importing triton, or move the tensors to CUDA")
        if first.dtype == torch.bfloat16 and dots:
            raise InputError(f"{what}: Triton's interpreter computes tl.dot on bfloat16 wrongly; run bfloat16 on "
                             "CUDA, or cast to float16/float32 on the CPU")
    elif first.device.type != "cuda":
        raise BackendUnavailable(f"{what}: tensors on {first.device} cannot run Triton kernels; use CUDA or the CPU "
                                 "interpreter")
    return first.dtype


def check_block_table(what: str, table, pools, lens, b: int) -> None:
    """A paged call's block table: [B, max_blocks] integers on the pools' device naming blocks inside them (not
    checked while a CUDA graph is being captured: that would sync), the lengths given, each pool's blocks holding
    their rows back to back ([blocks, PAGE, ...])."""
    pool = pools[0]
    if not isinstance(table, torch.Tensor) or table.dtype not in (torch.int32, torch.int64) or table.dim() != 2 \
            or table.shape[0] != b or table.device != pool.device:
        raise InputError(f"{what}: block_table must be an int32/int64 [{b}, max_blocks] tensor on {pool.device}, "
                         f"got {getattr(table, 'dtype', type(table).__name__)} {tuple(getattr(table, 'shape', ()))}")
    if lens is None:
        raise InputError(f"{what}: a paged cache (block_table) needs the lengths of the requests")
    if any(p.stride(0) != p.shape[1] * p.stride(1) for p in pools):
        raise InputError(f"{what}: a paged pool must hold each block's rows back to back ([blocks, PAGE, ...])")
    capturing = table.is_cuda and torch.cuda.is_current_stream_capturing()   # no device sync inside a capture
    if table.numel() and not capturing and (int(table.min()) < 0 or int(table.max()) >= pool.shape[0]):
        raise InputError(f"{what}: block_table names blocks outside the pool's {pool.shape[0]}")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact ('ieee') dots: Triton's default for fp32 is tf32, which misses the fp32 tolerance."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2_split(d: int) -> tuple[int, int, int, int]:
    """Split a head dim into a power-of-two part and a remainder: (D1, D2, BLOCK_D1, BLOCK_D2).

    Blocks are at least 16 wide (tl.dot's minimum on GPUs); BLOCK_D2 is a placeholder 16 when D2 == 0.
    """
    d1 = 1 << (d.bit_length() - 1)
    d2 = d - d1
    return d1, d2, max(16, d1), max(16, triton.next_power_of_2(d2)) if d2 else 16


# ----------------------------------------------------------------------------------------------------- kernel

@triton.jit
def _flash_tiles(acc, l_i, m_i, q1, q2, k_base, v_base, table_base, lo, hi, offs_m, T, S,
                 stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                 HEAD_D1: tl.constexpr, HEAD_D2: tl.constexpr, HEAD_DV: tl.constexpr,
                 BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                 PAGE: tl.constexpr):
    """Online-softmax update over key tiles [lo, hi). MASKED tiles check key bounds and the causal diagonal.
    PAGE > 0: key n is row n % PAGE of block table[n // PAGE] of the pool (a paged cache)."""
    offs_d1 = tl.arange(0, BLOCK_D1)
    offs_d2 = tl.arange(0, BLOCK_D2)
    offs_dv = tl.arange(0, BLOCK_DV)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T  # always true in the unmasked phase; kept so loads share one form
        rows = offs_n
        if PAGE > 0:
            rows = tl.load(table_base + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64) * PAGE + offs_n % PAGE
        k1 = tl.load(k_base + rows[:, None] * stride_kt + offs_d1[None, :] * stride_kd,
                     mask=n_ok[:, None] & (offs_d1[None, :] < HEAD_D1), other=0.0)
        qk = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        if HEAD_D2 > 0:
            k2 = tl.load(k_base + rows[:, None] * stride_kt + (HEAD_D1 + offs_d2[None, :]) * stride_kd,
                         mask=n_ok[:, None] & (offs_d2[None, :] < HEAD_D2), other=0.0)
            qk = tl.dot(q2, tl.trans(k2), qk, input_precision=PRECISION)
        qk = qk * qk_scale
        if MASKED:
            visible = n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + (T - S))
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet stay at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows[:, None] * stride_vt + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lens_ptr, table_ptr, S, T, HQ, GROUP, stride_tb,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    qk_scale,
    HEAD_D1: tl.constexpr, HEAD_D2: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    kv_len = T
    if HAS_LENS:  # this request's valid keys (clamped to the buffer); the queries sit at their end
        kv_len = tl.minimum(tl.load(lens_ptr + b).to(tl.int32), T)
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S
    offs_d1 = tl.arange(0, BLOCK_D1)
    offs_d2 = tl.arange(0, BLOCK_D2)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_rows = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs
    q1 = tl.load(q_rows + offs_d1[None, :] * stride_qd, mask=m_ok[:, None] & (offs_d1[None, :] < HEAD_D1), other=0.0)
    q2 = tl.load(q_rows + (HEAD_D1 + offs_d2[None, :]) * stride_qd,
                 mask=m_ok[:, None] & (offs_d2[None, :] < HEAD_D2), other=0.0)
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    if PAGE == 0:  # contiguous: request b's own [T, ...] rows; paged: rows of the pool through its block table
        k_base += b * stride_kb
        v_base += b * stride_vb
    table_base = table_ptr + b * stride_tb

    if CAUSAL:  # row i sees keys <= i + kv_len - S
        hi = tl.minimum(kv_len, (pid_m + 1) * BLOCK_M + kv_len - S)
        full = tl.minimum(kv_len, pid_m * BLOCK_M + kv_len - S + 1)
    else:
        hi = kv_len
        full = kv_len
    hi = tl.maximum(hi, 0)
    full = tl.maximum(full, 0) // BLOCK_N * BLOCK_N

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _flash_tiles(acc, l_i, m_i, q1, q2, k_base, v_base, table_base, 0, full, offs_m, kv_len, S,
                                 stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                                 HEAD_D1, HEAD_D2, HEAD_DV, BLOCK_D1, BLOCK_D2, BLOCK_DV,
                                 False, CAUSAL, PRECISION, BLOCK_N, PAGE)
    acc, l_i, m_i = _flash_tiles(acc, l_i, m_i, q1, q2, k_base, v_base, table_base, full, hi, offs_m, kv_len, S,
                                 stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                                 HEAD_D1, HEAD_D2, HEAD_DV, BLOCK_D1, BLOCK_D2, BLOCK_DV,
                                 True, CAUSAL, PRECISION, BLOCK_N, PAGE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DV))


# ----------------------------------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class FlashConfig:
    """One tile choice; `flash_attention(..., config=...)` runs it without autotuning (benchmarks sweep these)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def flash_configs(head_d: int, head_dv: int) -> list[FlashConfig]:
    """Autotune candidates for a head shape; one small tile on the interpreter (it does not time anything)."""
    if interpreting():
        return [FlashConfig(16, 16, 1, 1)]
    wide = max(head_d, head_dv) > 128  # 192/576-wide heads: smaller key tiles keep K, V and the acc in registers
    return [FlashConfig(bm, bn, w, st)
            for bm, bn, w, st in ((128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 4, 2),
                                  (128, 128, 8, 2))
            if not (wide and bn == 128)]


def _triton_configs(head_d: int, head_dv: int) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in flash_configs(head_d, head_dv)]


_TUNED: dict[tuple[int, int], object] = {}


def _tuned_kernel(head_d: int, head_dv: int):
    """The autotuned kernel for one head shape, keyed on (head dims, causal) within it."""
    key = (head_d, head_dv)
    if key not in _TUNED:
        tune = triton.autotune(configs=_triton_configs(head_d, head_dv),
                               key=["HEAD_D1", "HEAD_D2", "HEAD_DV", "HAS_LENS", "CAUSAL", "PAGE"])
        _TUNED[key] = tune(_flash_attention_kernel)
    return _TUNED[key]


# ----------------------------------------------------------------------------------------------------- host wrapper

def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True,
                    config: FlashConfig | None = None, kv_lens: torch.Tensor | None = None,
                    block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Causal (or full) attention, `attention_ref` semantics; returns [B, S, Hq, Dv] in q's dtype.

    kv_lens: optional [B] int32/int64 valid key counts (the rest of k/v is ignored; values above T are clamped),
    with the queries at the end of each request's valid keys: how a decode step reads a cache buffer of fixed
    capacity whose length lives on the device (CUDA-graph decode). Rows with no visible key (S > T under the
    causal rule) come out as zeros. `config` pins one tile choice; without it the tile is autotuned per head
    shape on first use (do that before capturing a CUDA graph). block_table [B, max_blocks]: a paged cache, k and
    v then pools [num_blocks, PAGE, Hkv, D|Dv] read through each request's blocks (kv_lens required).
    """
    dtype = check_tensors("flash_attention", q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ShapeError(f"flash_attention: {name} must be [B, S|T, H, D], got shape {tuple(t.shape)}")
    b, s, hq, d = q.shape
    t_len, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    paged = block_table is not None
    if paged:
        check_block_table("flash_attention", block_table, (k, v), kv_lens, b)
        t_len = block_table.shape[1] * k.shape[1]
    elif k.shape[0] != b or v.shape[0] != b:
        raise ShapeError(f"flash_attention: batch sizes differ (q {b}, k {k.shape[0]}, v {v.shape[0]})")
    if k.shape[3] != d:
        raise ShapeError(f"flash_attention: q head dim {d} != k head dim {k.shape[3]}")
    if (v.shape[:3] != k.shape[:3]) if paged else (v.shape[1] != t_len or v.shape[2] != hkv):
        raise ShapeError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in length or heads")
    if hkv == 0 or hq % hkv:
        raise ShapeError(f"flash_attention: {hq} query heads are not a multiple of {hkv} kv heads")
    if kv_lens is not None and (not isinstance(kv_lens, torch.Tensor) or tuple(kv_lens.shape) != (b,)
                                or kv_lens.dtype not in (torch.int32, torch.int64) or kv_lens.device != q.device):
        raise InputError(f"flash_attention: kv_lens must be an int32/int64 tensor [{b}] on {q.device}")
    out = torch.empty((b, s, hq, dv), dtype=dtype, device=q.device)
    if out.numel() == 0:
        return out
    d1, d2, bd1, bd2 = pow2_split(d)
    lens = kv_lens if kv_lens is not None else out  # unread without HAS_LENS
    args = (q, k, v, out, lens, block_table if paged else out, s, t_len, hq, hq // hkv,
            block_table.stride(0) if paged else 0, *q.stride(), *k.stride(), *v.stride(), *out.stride(), scale * LOG2E)
    meta = dict(HEAD_D1=d1, HEAD_D2=d2, HEAD_DV=dv, BLOCK_D1=bd1, BLOCK_D2=bd2,
                BLOCK_DV=max(16, triton.next_power_of_2(dv)), HAS_LENS=kv_lens is not None, CAUSAL=bool(causal),
                PRECISION=dot_precision(dtype), PAGE=k.shape[1] if paged else 0)
    if config is None:
        grid = lambda META: (triton.cdiv(s, META["BLOCK_M"]), b * hq)
        _tuned_kernel(d, dv)[grid](*args, **meta)
    else:
        grid = (triton.cdiv(s, config.block_m), b * hq)
        _flash_attention_kernel[grid](*args, **meta, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                                      num_warps=config.num_warps, num_stages=config.num_stages)
    return out
