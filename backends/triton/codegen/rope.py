"""Generated rotary embedding: one program per (token, block of heads), both layouts, any frequency scaling.

The inverse frequencies come from `dsgraph.ops.rope.rope_frequencies` (default, linear, YaRN, llama3) and are
passed as a [D/2] fp32 table; YaRN's cos/sin multiplier is baked in as a constant. Angles are computed in
fp32 exactly as the reference does (position * inv_freq), so no cos/sin cache has to be sized in advance.
Layouts: half-split pairs (i, i + D/2) (LLaMA/Qwen) or interleaved pairs (2i, 2i + 1) (DeepSeek-V2/V3).
"""
from __future__ import annotations

from .rowwise import _next_pow2, _row_warps
from .source import TRITON_DTYPES, KernelSource


def _rotate_pairs(src: str, dst: str, first: str, second: str, mask: str, tdt: str) -> str:
    """Kernel lines rotating the pairs (first, second) read at `src` by (cos, sin), written to `dst` in `tdt`:
    one text for `rope` and `mla_cache_row`, so the two stay numerically identical."""
    return f"""
    x1 = tl.load({src} + {first}, mask={mask}, other=0.0).to(tl.float32)
    x2 = tl.load({src} + {second}, mask={mask}, other=0.0).to(tl.float32)
    tl.store({dst} + {first}, (x1 * cos - x2 * sin).to({tdt}), mask={mask})
    tl.store({dst} + {second}, (x2 * cos + x1 * sin).to({tdt}), mask={mask})"""


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
    o_row = out_ptr + tok * (HEADS * {dim}) + h[:, None] * {dim}{_rotate_pairs("x_row", "o_row", f"({first})[None, :]",
                                                                      f"({second})[None, :]", "mask", tdt)}


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


def mla_cache_row(rank: int, dim: int, dtype: str, eps: float, interleaved: bool, mult: float) -> KernelSource:
    """Absorbed MLA's cache row (`mla.latent_row`) in one program per token: [RMSNorm(c_kv) * w | RoPE(k_pe)].

    launch(c_kv [B, S, C], k_pe [B, S, R], w [C], positions [B, S], inv_freq [R/2] fp32) -> [B, S, C+R];
    launch(..., dst, rows, start, mode) writes the rows straight into a cache instead (cache.append fused): token
    (b, s) goes to dst[b, row] with row = start + s (mode 0: the spare rows of a growing buffer), rows[s] (mode 1:
    a static-capacity step's device-side rows) or rows[b * S + s] with dst a flat [slots, C+R] pool (mode 2: the
    paged program's slots). The same numerics as `rowwise.rms_norm` and `rope` above, so the row equals norm.rms +
    rope + concat launched apart.
    """
    tdt, half = TRITON_DTYPES[dtype], dim // 2
    block_c, block_d = _next_pow2(rank), _next_pow2(half)
    first, second = ("2 * d", "2 * d + 1") if interleaved else ("d", f"d + {half}")
    body = f'''
import torch


@triton.jit
def _kernel(c_ptr, k_ptr, w_ptr, pos_ptr, freq_ptr, out_ptr, rows_ptr, start, seq, stride_c, stride_k, stride_ob,
            stride_ot, C: tl.constexpr, R: tl.constexpr, HALF: tl.constexpr, EPS: tl.constexpr, MULT: tl.constexpr,
            MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    if MODE == 0:
        row = start + tok % seq
    elif MODE == 1:
        row = tl.load(rows_ptr + tok % seq).to(tl.int64)
    else:
        row = tl.load(rows_ptr + tok).to(tl.int64)
    out_row = out_ptr + (tok // seq) * stride_ob + row * stride_ot
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    x = tl.load(c_ptr + tok * stride_c + cols, mask=c_ok, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / C + EPS)
    w = tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(out_row + cols, ((x * inv_rms).to({tdt}).to(tl.float32) * w).to({tdt}), mask=c_ok)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    angle = tl.load(pos_ptr + tok).to(tl.float32) * tl.load(freq_ptr + d, mask=d_ok, other=0.0)
    cos = tl.cos(angle) * MULT
    sin = tl.sin(angle) * MULT
    k_row = k_ptr + tok * stride_k{_rotate_pairs("k_row", "out_row + C", f"({first})", f"({second})", "d_ok", tdt)}


def _rows(t, n):
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def launch(c_kv, k_pe, w, positions, inv_freq, dst=None, rows=None, start=0, mode=0):
    if dst is None:
        dst = torch.empty((*c_kv.shape[:-1], {rank + dim}), dtype=c_kv.dtype, device=c_kv.device)
    c2, k2 = _rows(c_kv, {rank}), _rows(k_pe, {dim})
    pos = positions.reshape(-1)
    if not pos.is_contiguous():
        pos = pos.contiguous()
    if mode == 2:
        stride_ob, stride_ot = 0, dst.stride(0)
    else:
        stride_ob, stride_ot = dst.stride(0), dst.stride(1)
    if c2.shape[0]:
        _kernel[(c2.shape[0],)](c2, k2, w, pos, inv_freq, dst, rows if rows is not None else pos, start,
                                c_kv.shape[1], c2.stride(0), k2.stride(0), stride_ob, stride_ot, C={rank}, R={dim},
                                HALF={half}, EPS={eps!r}, MULT={float(mult)!r}, MODE=mode, BLOCK_C={block_c},
                                BLOCK_D={block_d}, num_warps={_row_warps(block_c)})
    return dst
'''
    layout = "interleaved" if interleaved else "half-split"
    name = f"mla_cache_row_c{rank}_r{dim}_{'il' if interleaved else 'hs'}_{dtype}"
    return KernelSource(name, f"absorbed-MLA cache row: RMSNorm over {rank} + RoPE ({layout} pairs) over {dim}, "
                              f"concatenated, {dtype}, eps={eps}, cos/sin multiplier {mult:.6g}; written fresh or "
                              "into the cache", body)
