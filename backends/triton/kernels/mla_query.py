"""Absorbed MLA's query in one launch: `mla.query_absorbed` (dsgraph/ops/mla_fused.py).

    out[m, h, :C]  = q_nope[m, h] @ W_UK[h]          (fp32 accumulation, rounded to the output dtype)
    out[m, h, C:]  = RoPE(q_pe[m, h]) at positions[m]

Grid (C / BLOCK_C + 1, H, M / BLOCK_M): the first C / BLOCK_C programs of a head compute a column block of the
absorbed query (W_UK's block is read once per M tile, so a decode batch streams W_UK once), the last one rotates
the head's rope part. At decode that replaces the cuBLAS bmm, the RoPE kernel and the concat (three launches; the
MLA decode kernel then reads one contiguous query). RoPE's angles are fp32 position * inv_freq, as the reference's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsgraph.errors import ShapeError

from .common import check_float, dot_precision


@triton.jit
def _mla_query_kernel(qn_ptr, qp_ptr, w_ptr, pos_ptr, freq_ptr, out_ptr, M,
                      stride_nm, stride_nh, stride_pm, stride_ph, stride_wh, stride_wd, stride_om, stride_oh,
                      DN: tl.constexpr, C: tl.constexpr, HALF: tl.constexpr, MULT: tl.constexpr,
                      INTERLEAVED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    cb = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(2).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rows < M
    out_rows = out_ptr + rows[:, None] * stride_om + h * stride_oh
    if cb * BLOCK_C < C:
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cols < C
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for d0 in range(0, DN, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < DN
            q = tl.load(qn_ptr + rows[:, None] * stride_nm + h * stride_nh + d[None, :],
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_ptr + h * stride_wh + d[:, None] * stride_wd + cols[None, :],
                        mask=d_ok[:, None] & c_ok[None, :], other=0.0)
            acc = tl.dot(q, w, acc, input_precision=PRECISION)
        tl.store(out_rows + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])
    else:
        i = tl.arange(0, BLOCK_R)
        i_ok = i < HALF
        angle = tl.load(pos_ptr + rows, mask=m_ok, other=0).to(tl.float32)[:, None] * \
            tl.load(freq_ptr + i, mask=i_ok, other=0.0)[None, :]
        cos = tl.cos(angle) * MULT
        sin = tl.sin(angle) * MULT
        if INTERLEAVED:
            first, second = 2 * i, 2 * i + 1
        else:
            first, second = i, i + HALF
        mask = m_ok[:, None] & i_ok[None, :]
        src = qp_ptr + rows[:, None] * stride_pm + h * stride_ph
        x1 = tl.load(src + first[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + second[None, :], mask=mask, other=0.0).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        tl.store(out_rows + C + first[None, :], (x1 * cos - x2 * sin).to(dt), mask=mask)
        tl.store(out_rows + C + second[None, :], (x2 * cos + x1 * sin).to(dt), mask=mask)


def _heads(t: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] -> a [B*S, H, D] view with unit last stride (a copy only if it must)."""
    t3 = t.reshape(-1, t.shape[2], t.shape[3])
    return t3 if t3.stride(-1) == 1 else t3.contiguous()


def mla_query(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, positions: torch.Tensor,
              inv_freq: torch.Tensor, mult: float, interleaved: bool) -> torch.Tensor:
    """[q_nope @ W_UK | RoPE(q_pe)] per head -> [B, S, H, C+R] in q_nope's dtype. q_nope [B,S,H,dn] and q_pe
    [B,S,H,R] may be strided views of one projection (unit last stride); w_uk [H, dn, C]; inv_freq [R/2] fp32."""
    dtype = check_float("mla_query", q_nope=q_nope, q_pe=q_pe, w_uk=w_uk)
    b, s, h, dn = q_nope.shape
    r, c = q_pe.shape[-1], w_uk.shape[-1]
    if q_pe.shape[:3] != (b, s, h) or w_uk.shape[:2] != (h, dn) or r % 2 or positions.shape != (b, s):
        raise ShapeError(f"mla_query: q_nope {tuple(q_nope.shape)}, q_pe {tuple(q_pe.shape)}, w_uk "
                         f"{tuple(w_uk.shape)}, positions {tuple(positions.shape)} do not fit [B,S,H,dn], "
                         "[B,S,H,R even], [H,dn,C], [B,S]")
    qn, qp = _heads(q_nope), _heads(q_pe)
    w = w_uk if w_uk.stride(-1) == 1 else w_uk.contiguous()
    pos = positions.reshape(-1).contiguous()
    m = qn.shape[0]
    out = torch.empty((b, s, h, c + r), dtype=dtype, device=q_nope.device)
    if m == 0:
        return out
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_c = 64 if m <= 32 else 128
    grid = (triton.cdiv(c, block_c) + 1, h, triton.cdiv(m, block_m))
    o3 = out.view(m, h, c + r)
    _mla_query_kernel[grid](qn, qp, w, pos, inv_freq, o3, m, qn.stride(0), qn.stride(1), qp.stride(0), qp.stride(1),
                            w.stride(0), w.stride(1), o3.stride(0), o3.stride(1), DN=dn, C=c, HALF=r // 2,
                            MULT=float(mult), INTERLEAVED=interleaved, PRECISION=dot_precision(dtype),
                            BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_D=min(64, max(16, triton.next_power_of_2(dn))),
                            BLOCK_R=max(16, triton.next_power_of_2(r // 2)), num_warps=4)
    return out
