"""Generated rotary embedding: one program per (token, block of heads), both layouts, any frequency scaling.

The inverse frequencies come from `dsgraph.ops.rope.rope_frequencies` (default, linear, YaRN, llama3) and are
passed as a [D/2] fp32 table; YaRN's cos/sin multiplier is baked in as a constant. Angles are computed in
fp32 exactly as the reference does (position * inv_freq), so no cos/sin cache has to be sized in advance.
Layouts: half-split pairs (i, i + D/2) (LLaMA/Qwen) or interleaved pairs (2i, 2i + 1) (DeepSeek-V2/V3).
"""
from __future__ import annotations

from .rowwise import _next_pow2
from .source import TRITON_DTYPES, KernelSource


def rope(dim: int, heads: int, dtype: str, interleaved: bool, mult: float) -> KernelSource:
    """launch(x [B, S, *H, D], positions [B, S], inv_freq [D/2] fp32) -> rotated x (same shape and dtype)."""
    tdt, half = TRITON_DTYPES[dtype], dim // 2
    block_d, block_h = _next_pow2(half), min(_next_pow2(heads), 16)
    # element offsets of the two members of pair i inside a head
    first, second = ("2 * d", "2 * d + 1") if interleaved else ("d", f"d + {half}")
    body = f'''
import torch


@triton.jit
def _kernel(x_ptr, pos_ptr, freq_ptr, out_ptr, stride_xt, stride_xh, HEADS: tl.constexpr, HALF: tl.constexpr,
            MULT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    mask = (h < HEADS)[:, None] & d_ok[None, :]
    angle = tl.load(pos_ptr + tok).to(tl.float32) * tl.load(freq_ptr + d, mask=d_ok, other=0.0)
    cos = (tl.cos(angle) * MULT)[None, :]
    sin = (tl.sin(angle) * MULT)[None, :]
    x_row = x_ptr + tok * stride_xt + h[:, None] * stride_xh
    x1 = tl.load(x_row + ({first})[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + ({second})[None, :], mask=mask, other=0.0).to(tl.float32)
    o_row = out_ptr + tok * (HEADS * {dim}) + h[:, None] * {dim}
    tl.store(o_row + ({first})[None, :], (x1 * cos - x2 * sin).to({tdt}), mask=mask)
    tl.store(o_row + ({second})[None, :], (x2 * cos + x1 * sin).to({tdt}), mask=mask)


def launch(x, positions, inv_freq):
    tokens = positions.numel()
    x3 = x.reshape(tokens, {heads}, {dim})
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    pos = positions.reshape(tokens)
    if not pos.is_contiguous():
        pos = pos.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if tokens:
        grid = (tokens, triton.cdiv({heads}, {block_h}))
        _kernel[grid](x3, pos, inv_freq, out, x3.stride(0), x3.stride(1), HEADS={heads}, HALF={half},
                      MULT={float(mult)!r}, BLOCK_H={block_h}, BLOCK_D={block_d},
                      num_warps={1 if block_h * block_d <= 512 else 4})
    return out
'''
    layout = "interleaved" if interleaved else "half-split"
    name = f"rope_d{dim}_h{heads}_{'il' if interleaved else 'hs'}_{dtype}"
    return KernelSource(name, f"RoPE ({layout} pairs) over {heads} heads of dim {dim}, {dtype}, "
                              f"cos/sin multiplier {mult:.6g}", body)
