"""Generated row kernels: RMSNorm (weighted or not), residual add + RMSNorm, LayerNorm, and the SwiGLU activation
(plain or V4's clamped) of a fused gate|up GEMM.

One program per row (the row width is a compile-time constant, so the whole row sits in registers and the
reduction is one `tl.sum`). Numerics follow the op references: fp32 math, the normalised row rounded to the
input dtype before the weight multiply (HF's order), the residual sum rounded to the input dtype before it is
normalised.
"""
from __future__ import annotations

from .source import TRITON_DTYPES, KernelSource


def _row_warps(block: int) -> int:
    return 1 if block <= 256 else 4 if block <= 2048 else 8 if block <= 8192 else 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rms_norm(n: int, dtype: str, eps: float, residual: bool, weighted: bool = True) -> KernelSource:
    """norm.rms (residual=False: launch(x, w) -> y), norm.add_rms (launch(x, r, w) -> (y, x + r)) or
    norm.rms_unweighted (weighted=False, non-residual only: launch(x) -> y, the fp32 normalised row rounded once)."""
    tdt, block = TRITON_DTYPES[dtype], _next_pow2(n)
    name = f"{'add_rms' if residual else 'rms' if weighted else 'rms_plain'}_n{n}_{dtype}"
    if residual:
        sig, load = "x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, stride_x, stride_r, stride_y, stride_s", f"""
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to({tdt})  # the residual stream keeps the model dtype
    tl.store(s_ptr + row * stride_s + cols, s, mask=mask)
    x = s.to(tl.float32)"""
    else:
        sig, load = f"x_ptr, {'w_ptr, ' if weighted else ''}y_ptr, stride_x, stride_y", """
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)"""
    scale = f"""
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x * inv_rms).to({tdt}).to(tl.float32) * w""" if weighted else """
    y = x * inv_rms"""
    kernel = f'''
@triton.jit
def _kernel({sig}, N: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N{load}
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / N + EPS){scale}
    tl.store(y_ptr + row * stride_y + cols, y.to({tdt}), mask=mask)
'''
    meta = f"N={n}, EPS={eps!r}, BLOCK={block}, num_warps={_row_warps(block)}"
    if residual:
        host = f'''
def launch(x, r, w):
    x2, r2 = _rows(x), _rows(r)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _kernel[(x2.shape[0],)](x2, r2, w, y, s, x2.stride(0), r2.stride(0), {n}, {n}, {meta})
    return y, s
'''
    else:
        w = ", w" if weighted else ""
        host = f'''
def launch(x{w}):
    x2 = _rows(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _kernel[(x2.shape[0],)](x2{w}, y, x2.stride(0), {n}, {meta})
    return y
'''
    rows = f'''
import torch


def _rows(t):
    """[..., N] -> a [rows, N] view with unit column stride (copies only if it must)."""
    t2 = t.reshape(-1, {n})
    return t2 if t2.stride(-1) == 1 else t2.contiguous()
'''
    title = (f"{'residual add + ' if residual else ''}{'' if weighted else 'unweighted '}RMSNorm over rows of {n} "
             f"{dtype} values, eps={eps}")
    return KernelSource(name, title, rows + kernel + host)


def swiglu(inter: int, dtype: str, limit: float | None = None) -> KernelSource:
    """act.swiglu: gate_up [..., 2I] -> silu(gate) * up [..., I]; launch(gu) -> out. With `limit`,
    act.swiglu_clamped: silu(min(gate, limit)) * clamp(up, -limit, limit)."""
    tdt = TRITON_DTYPES[dtype]
    clamp = "" if limit is None else f"""
    g = tl.minimum(g, {float(limit)!r})
    u = tl.minimum(tl.maximum(u, {-float(limit)!r}), {float(limit)!r})"""
    block = min(_next_pow2(inter), 1024)
    body = f'''
import torch


@triton.jit
def _kernel(gu_ptr, out_ptr, stride_gu, stride_out, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + INTER + cols, mask=mask, other=0.0).to(tl.float32){clamp}
    y = g / (1.0 + tl.exp(-g)) * u  # silu(g) * u, as F.silu computes it
    tl.store(out_ptr + row * stride_out + cols, y.to({tdt}), mask=mask)


def launch(gu):
    gu2 = gu.reshape(-1, {2 * inter})
    if gu2.stride(-1) != 1:
        gu2 = gu2.contiguous()
    out = torch.empty(gu.shape[:-1] + ({inter},), dtype=gu.dtype, device=gu.device)
    if gu2.shape[0]:
        grid = (gu2.shape[0], triton.cdiv({inter}, {block}))
        _kernel[grid](gu2, out, gu2.stride(0), {inter}, INTER={inter}, BLOCK={block}, num_warps={_row_warps(block)})
    return out
'''
    if limit is None:
        return KernelSource(f"swiglu_i{inter}_{dtype}", f"SwiGLU activation silu(gate) * up, I={inter}, {dtype}", body)
    return KernelSource(f"swiglu_clamped_i{inter}_{dtype}", f"clamped SwiGLU activation silu(min(gate, {limit})) * "
                        f"clamp(up, -{limit}, {limit}), I={inter}, {dtype}", body)


def layer_norm(n: int, dtype: str, eps: float) -> KernelSource:
    """norm.layer: launch(x, w, b) -> (x - mean) * rsqrt(var + eps) * w + b over rows of n, fp32 inside."""
    tdt, block = TRITON_DTYPES[dtype], _next_pow2(n)
    body = f'''
import torch


@triton.jit
def _kernel(x_ptr, w_ptr, b_ptr, y_ptr, stride_x, stride_y, N: tl.constexpr, EPS: tl.constexpr,
            BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    centred = tl.where(mask, x - tl.sum(x, axis=0) / N, 0.0)
    inv_std = tl.rsqrt(tl.sum(centred * centred, axis=0) / N + EPS)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (centred * inv_std * w + b).to({tdt}), mask=mask)


def launch(x, w, b):
    x2 = x.reshape(-1, {n})
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _kernel[(x2.shape[0],)](x2, w, b, y, x2.stride(0), {n}, N={n}, EPS={eps!r}, BLOCK={block},
                                num_warps={_row_warps(block)})
    return y
'''
    return KernelSource(f"layer_norm_n{n}_{dtype}", f"LayerNorm over rows of {n} {dtype} values, eps={eps}", body)


def fp8_dequant_rows(n: int, group: int, dtype: str) -> KernelSource:
    """kv.dequant_fp8: launch(q, scale) -> e4m3 rows [..., n] times their per-`group` fp32 scales, in `dtype`."""
    tdt, block = TRITON_DTYPES[dtype], _next_pow2(n)
    body = f'''
import torch


@triton.jit
def _kernel(q_ptr, s_ptr, y_ptr, N: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    q = tl.load(q_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + row * (N // GROUP) + cols // GROUP, mask=mask, other=0.0)
    tl.store(y_ptr + row * N + cols, (q * s).to({tdt}), mask=mask)


def launch(q, s):
    q2, s2 = q.reshape(-1, {n}).contiguous(), s.reshape(-1, {n // group}).contiguous()
    y = torch.empty(q.shape, dtype=torch.{dtype}, device=q.device)
    if q2.shape[0]:
        _kernel[(q2.shape[0],)](q2, s2, y, N={n}, GROUP={group}, BLOCK={block}, num_warps={_row_warps(block)})
    return y
'''
    return KernelSource(f"fp8_dequant_n{n}_g{group}_{dtype}", f"e4m3 rows of {n} x fp32 scales per {group}, to {dtype}",
                        body)


def fp8_quant_rows(n: int, group: int) -> KernelSource:
    """kv.quant_fp8: launch(x) -> (e4m3 rows [..., n], fp32 scales [..., n / group]), each group divided by its
    amax / 448 (IEEE division, as the reference's, so the e4m3 rounding sees its quotients). n / group and
    group must be powers of two (the row is reshaped to [n / group, group] in registers)."""
    groups = n // group
    body = f'''
import torch


@triton.jit
def _kernel(x_ptr, q_ptr, s_ptr, N: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x = tl.reshape(tl.load(x_ptr + row * N + tl.arange(0, N)).to(tl.float32), (GROUPS, GROUP))
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12), 448.0)
    q = tl.div_rn(x, tl.broadcast_to(scale[:, None], (GROUPS, GROUP))).to(tl.float8e4nv)
    tl.store(q_ptr + row * N + tl.arange(0, N), tl.reshape(q, (N,)))
    tl.store(s_ptr + row * GROUPS + tl.arange(0, GROUPS), scale)


def launch(x):
    x2 = x.reshape(-1, {n}).contiguous()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((*x.shape[:-1], {groups}), dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        _kernel[(x2.shape[0],)](x2, q, s, N={n}, GROUP={group}, GROUPS={groups}, num_warps={_row_warps(n)})
    return q, s
'''
    return KernelSource(f"fp8_quant_n{n}_g{group}", f"rows of {n} to e4m3 + fp32 scales per {group}", body)
