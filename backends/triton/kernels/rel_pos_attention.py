"""SAM's attention with decomposed relative positions (op `attention.rel_pos`): bidirectional flash attention,
online softmax over key tiles, with the relative-position bias added to each score tile in the kernel.

q, k, v [N, T, heads, d] over a gh x gw grid (T = gh * gw, query i at row i // gw, column i % gw);
logits = scale * q.k + q.rel_h[qy, ky] + q.rel_w[qx, kx].

The bias is decomposed, as SAM defines it: bh[n, h, i, ky] = q_i . rel_h[qy, ky] and bw[n, h, i, kx] =
q_i . rel_w[qx, kx] are [N*heads, T, gh] and [.., T, gw], a factor of T / (gh + gw) smaller than the [T, T]
bias they make (32x for SAM ViT-B's 64 x 64 global blocks). The host computes them first, in fp32, as two
batched GEMMs (torch.einsum: cuBLAS on CUDA): each query row needs its own table slice rel_h[qy] ([gh, d]), a
different matrix per row, which is no tl.dot tile; in-kernel it would cost a [BLOCK_M, gh, d] gather per query
tile. The kernel then adds bh[i, n // gw] + bw[i, n % gw] to every score tile: two small gathers from rows
that stay in cache, so the [T, T] bias is never written to memory.

Each program owns BLOCK_M query rows of one (image, head) and walks all keys: full tiles without masks, then
the ragged last tile masked. Scores use exp2 with log2(e) folded into the scale and into the bias (the host
scales q by log2(e) before the bias GEMMs); accumulation is fp32. Head dims are padded to a power of two.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dsgraph.errors import ShapeError

from .flash_attention import LOG2E, check_tensors, dot_precision, interpreting


@triton.jit
def _rel_pos_tiles(acc, l_i, m_i, q, k_base, v_base, bh_rows, bw_rows, lo, hi, T, GW,
                   stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                   HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Online-softmax update over key tiles [lo, hi); MASKED tiles clamp their key rows and drop keys >= T."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_D
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        keys = offs_n
        if MASKED:
            keys = tl.minimum(offs_n, T - 1)
        k = tl.load(k_base + keys[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=d_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        qk += tl.load(bh_rows + (keys // GW)[None, :]) + tl.load(bw_rows + (keys % GW)[None, :])
        if MASKED:
            qk = tl.where(offs_n[None, :] < T, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))   # finite: every row sees a key in its first tile
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + keys[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=d_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _rel_pos_attention_kernel(
    q_ptr, k_ptr, v_ptr, bh_ptr, bw_ptr, o_ptr, T, HEADS, GH, GW,
    stride_qn, stride_qt, stride_qh, stride_qd,
    stride_kn, stride_kt, stride_kh, stride_kd,
    stride_vn, stride_vt, stride_vh, stride_vd,
    stride_on, stride_ot, stride_oh, stride_od,
    qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1).to(tl.int64)
    n = pid_nh // HEADS
    h = pid_nh % HEADS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.minimum(offs_m, T - 1)   # rows past T repeat the last one; only the store is masked
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_D
    q = tl.load(q_ptr + n * stride_qn + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=d_ok, other=0.0)
    bh_rows = bh_ptr + pid_nh * T * GH + rows[:, None] * GH   # [N*heads, T, gh] and [N*heads, T, gw], contiguous
    bw_rows = bw_ptr + pid_nh * T * GW + rows[:, None] * GW
    k_base = k_ptr + n * stride_kn + h * stride_kh
    v_base = v_ptr + n * stride_vn + h * stride_vh
    full = T // BLOCK_N * BLOCK_N

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _rel_pos_tiles(acc, l_i, m_i, q, k_base, v_base, bh_rows, bw_rows, 0, full, T, GW,
                                   stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                                   HEAD_D, BLOCK_D, False, PRECISION, BLOCK_N)
    acc, l_i, m_i = _rel_pos_tiles(acc, l_i, m_i, q, k_base, v_base, bh_rows, bw_rows, full, T, T, GW,
                                   stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                                   HEAD_D, BLOCK_D, True, PRECISION, BLOCK_N)
    out = acc / l_i[:, None]
    o_ptrs = o_ptr + n * stride_on + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < T) & d_ok)


def _configs() -> list[triton.Config]:
    """Tile candidates (SAM heads are 64 wide); one small tile on the interpreter, which times nothing."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (128, 32, 4, 2))]


@functools.cache
def _kernel():
    """Tuned per token count (SAM has two: its windows' and the global blocks'), head dim and dot precision."""
    return triton.autotune(configs=_configs(), key=["T", "HEAD_D", "PRECISION"])(_rel_pos_attention_kernel)


def relative_bias(q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bh [N*heads, T, gh], bw [N*heads, T, gw]) in fp32, pre-scaled by log2(e) for the kernel's exp2."""
    n, _, heads, d = q.shape
    gh, gw = rel_h.shape[0], rel_w.shape[0]
    grid = q.float().reshape(n, gh, gw, heads, d) * LOG2E
    bh = torch.einsum("nyxhd,ykd->nhyxk", grid, rel_h.float()).reshape(n * heads, gh * gw, gh)
    bw = torch.einsum("nyxhd,xkd->nhyxk", grid, rel_w.float()).reshape(n * heads, gh * gw, gw)
    return bh.contiguous(), bw.contiguous()


def rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """`attention.rel_pos` semantics: q, k, v [N, gh*gw, heads, d], rel_h [gh, gh, d], rel_w [gw, gw, d];
    returns [N, gh*gw, heads, d] in q's dtype."""
    dtype = check_tensors("rel_pos_attention", q=q, k=k, v=v, rel_h=rel_h, rel_w=rel_w)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.shape != q.shape:
            raise ShapeError(f"rel_pos_attention: {name} must be [N, T, heads, d] like q {tuple(q.shape)}, got "
                             f"{tuple(t.shape)}")
    n, t_len, heads, d = q.shape
    gh, gw = rel_h.shape[0], rel_w.shape[0]
    if rel_h.shape != (gh, gh, d) or rel_w.shape != (gw, gw, d) or gh * gw != t_len:
        raise ShapeError(f"rel_pos_attention: rel_h {tuple(rel_h.shape)} / rel_w {tuple(rel_w.shape)} must be "
                         f"[gh, gh, {d}] / [gw, gw, {d}] with gh * gw = {t_len} tokens")
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if out.numel() == 0:
        return out
    bh, bw = relative_bias(q, rel_h, rel_w)
    grid = lambda META: (triton.cdiv(t_len, META["BLOCK_M"]), n * heads)
    _kernel()[grid](q, k, v, bh, bw, out, t_len, heads, gh, gw, *q.stride(), *k.stride(), *v.stride(),
                    *out.stride(), scale * LOG2E, HEAD_D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                    PRECISION=dot_precision(dtype))
    return out
