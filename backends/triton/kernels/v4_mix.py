"""DeepSeek-V4's mHC hyper-connections and hash routing as one launch each (ops hc.pre, hc.post, hc.head,
moe.route_hash; semantics in dsgraph/ops/v4_mix.py).

`_hc_mix_kernel`, one program per token: pass 1 streams the token's N*D stream values and the fp32 projection
fn in BLOCK chunks, accumulating the sum of squares and the raw projections (the unweighted RMSNorm is a
per-token scalar, so it multiplies the dot products afterwards); the weights follow in registers — pre =
sigmoid(.)+eps, and for hc.pre post = 2*sigmoid(.) and comb = Sinkhorn(softmax(.)+eps) with every one of the
`iters` row/column normalisations on an [N, N] register tile (padded lanes held at 0 so they add nothing); pass
2 re-reads x in D chunks for the weighted merge sum_n pre[n] x[n]. hc.head is the same kernel without post/comb.
`_hc_post_kernel`: out[n] = post[n] * y + sum_j comb[j, n] x[j], one program per (token, D chunk).
On a GPU one program streams the whole fn (24 x N*D fp32) per token; at decode that is one SM's bandwidth.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsgraph.errors import ShapeError

from .common import check_device
from .routing import sqrt_softplus


@triton.jit
def _hc_mix_kernel(x_ptr, fn_ptr, base_ptr, scale_ptr, out_ptr, post_ptr, comb_ptr, stride_x,
                   N: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                   FULL: tl.constexpr, ITERS: tl.constexpr, EPS: tl.constexpr, NORM_EPS: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    ND: tl.constexpr = N * D
    i = tl.arange(0, BN)
    j = tl.arange(0, BN)
    ok = i < N
    cell_ok = ok[:, None] & (j[None, :] < N)
    comb_row = 2 * N + i[:, None] * N + j[None, :]  # fn / base row of comb[i, j]
    ss = tl.zeros((BLOCK,), dtype=tl.float32)
    pre_acc = tl.zeros((BN,), dtype=tl.float32)
    post_acc = tl.zeros((BN,), dtype=tl.float32)
    comb_acc = tl.zeros((BN, BN), dtype=tl.float32)
    for c0 in range(0, ND, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        c_ok = c < ND
        xv = tl.load(x_ptr + tok * stride_x + c, mask=c_ok, other=0.0).to(tl.float32)
        ss += xv * xv
        w = tl.load(fn_ptr + i[:, None] * ND + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
        pre_acc += tl.sum(w * xv[None, :], axis=1)
        if FULL:
            w = tl.load(fn_ptr + (N + i[:, None]) * ND + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
            post_acc += tl.sum(w * xv[None, :], axis=1)
            w3 = tl.load(fn_ptr + comb_row[:, :, None] * ND + c[None, None, :],
                         mask=cell_ok[:, :, None] & c_ok[None, None, :], other=0.0)
            comb_acc += tl.sum(w3 * xv[None, None, :], axis=2)
    inv_rms = tl.rsqrt(tl.sum(ss, axis=0) / ND + NORM_EPS)
    pre = tl.sigmoid(pre_acc * inv_rms * tl.load(scale_ptr) + tl.load(base_ptr + i, mask=ok, other=0.0)) + EPS
    pre = tl.where(ok, pre, 0.0)
    if FULL:
        post = 2.0 * tl.sigmoid(post_acc * inv_rms * tl.load(scale_ptr + 1)
                                + tl.load(base_ptr + N + i, mask=ok, other=0.0))
        tl.store(post_ptr + tok * N + i, post, mask=ok)
        logit = comb_acc * inv_rms * tl.load(scale_ptr + 2) + tl.load(base_ptr + comb_row, mask=cell_ok, other=0.0)
        logit = tl.where(cell_ok, logit, float("-inf"))
        p = tl.where(cell_ok, tl.exp(logit - tl.where(ok, tl.max(logit, axis=1), 0.0)[:, None]), 0.0)
        total = tl.where(ok, tl.sum(p, axis=1), 1.0)  # padded rows: no 0 / 0
        comb = tl.where(cell_ok, p / total[:, None] + EPS, 0.0)
        comb = comb / (tl.sum(comb, axis=0)[None, :] + EPS)
        for _ in range(ITERS - 1):
            comb = comb / (tl.sum(comb, axis=1)[:, None] + EPS)
            comb = comb / (tl.sum(comb, axis=0)[None, :] + EPS)
        tl.store(comb_ptr + tok * N * N + i[:, None] * N + j[None, :], comb, mask=cell_ok)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        xv = tl.load(x_ptr + tok * stride_x + i[:, None] * D + d[None, :], mask=ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        merged = tl.sum(pre[:, None] * xv, axis=0)
        tl.store(out_ptr + tok * D + d, merged.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _hc_post_kernel(x_ptr, y_ptr, post_ptr, comb_ptr, out_ptr, stride_x, stride_y,
                    N: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    jn = tl.arange(0, BN)  # the source stream j (axis 0) and the target stream n (axis 1)
    ok = jn < N
    comb = tl.load(comb_ptr + tok * N * N + jn[:, None] * N + jn[None, :], mask=ok[:, None] & ok[None, :],
                   other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + tok * stride_x + jn[:, None] * D + d[None, :], mask=ok[:, None] & d_ok[None, :],
                 other=0.0).to(tl.float32)
    yv = tl.load(y_ptr + tok * stride_y + d, mask=d_ok, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + tok * N + jn, mask=ok, other=0.0).to(tl.float32)
    mixed = tl.sum(comb[:, :, None] * xv[:, None, :], axis=0)  # [n, d] = sum_j comb[j, n] x[j, d]
    out = post[:, None] * yv[None, :] + mixed
    tl.store(out_ptr + tok * N * D + jn[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=ok[:, None] & d_ok[None, :])


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def hc_mix(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, iters: int = 20,
           eps: float = 1e-6, norm_eps: float = 1e-6, full: bool = True):
    """hc.pre (full: (collapsed [B,S,D], post [B,S,N] fp32, comb [B,S,N,N] fp32)) or hc.head (collapsed only)
    of streams x [B,S,N,D], projection fn [(2+N)N or N, N*D], base and scale (fp32)."""
    check_device("hc mix", x)
    if x.dim() != 4:
        raise ShapeError(f"hc mix: streams must be [B, S, N, D], got {tuple(x.shape)}")
    *lead, n, d = x.shape
    rows = (2 + n) * n if full else n
    if fn.shape != (rows, n * d) or base.shape != (rows,) or scale.shape != ((3,) if full else (1,)):
        raise ShapeError(f"hc mix: fn {tuple(fn.shape)}, base {tuple(base.shape)}, scale {tuple(scale.shape)} do "
                         f"not fit {n} streams of {d} ({'hc.pre' if full else 'hc.head'})")
    if iters < 1:
        raise ShapeError(f"hc.pre: Sinkhorn needs iters >= 1, got {iters}")
    x2 = _rows(x, n * d)
    fn, base, scale = (t.float().contiguous() for t in (fn, base, scale))
    out = torch.empty((*lead, d), dtype=x.dtype, device=x.device)
    post = torch.empty((*lead, n), dtype=torch.float32, device=x.device)
    comb = torch.empty((*lead, n, n), dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        bn = _pow2(n)
        block = min(_pow2(n * d), max(16, 2048 // (bn * bn)))
        _hc_mix_kernel[(x2.shape[0],)](
            x2, fn, base, scale, out, post, comb, x2.stride(0), N=n, D=d, BN=bn, BLOCK=block,
            BLOCK_D=min(_pow2(d), max(16, 2048 // bn)), FULL=full, ITERS=iters, EPS=float(eps),
            NORM_EPS=float(norm_eps), num_warps=4)
    return (out, post, comb) if full else out


def hc_post(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """hc.post: streams x [B,S,N,D], block output y [B,S,D], post [B,S,N], comb [B,S,N,N] -> [B,S,N,D]."""
    check_device("hc.post", x)
    if x.dim() != 4 or y.shape != x.shape[:2] + x.shape[3:] or post.shape != x.shape[:3] \
            or comb.shape != x.shape[:3] + x.shape[2:3]:
        raise ShapeError(f"hc.post: y {tuple(y.shape)}, post {tuple(post.shape)}, comb {tuple(comb.shape)} do not "
                         f"fit streams {tuple(x.shape)}")
    *lead, n, d = x.shape
    x2, y2 = _rows(x, n * d), _rows(y, d)
    post, comb = post.contiguous(), comb.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        bn, block_d = _pow2(n), min(_pow2(d), 256)
        _hc_post_kernel[(x2.shape[0], triton.cdiv(d, block_d))](
            x2, y2, post, comb, out, x2.stride(0), y2.stride(0), N=n, D=d, BN=bn, BLOCK_D=block_d,
            num_warps=4 if block_d >= 256 else 1)
    return out


@triton.jit
def _hash_route_kernel(logits_ptr, table_ptr, ids_ptr, w_out_ptr, id_out_ptr, stride_l, stride_t,
                       K: tl.constexpr, BLOCK_K: tl.constexpr, SCALE: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, BLOCK_K)
    ok = slot < K
    row = tl.load(ids_ptr + tok).to(tl.int64)
    expert = tl.load(table_ptr + row * stride_t + slot, mask=ok, other=0).to(tl.int64)
    logit = tl.load(logits_ptr + tok * stride_l + expert, mask=ok, other=0.0).to(tl.float32)
    score = tl.where(ok, sqrt_softplus(logit), 0.0)
    gates = score / (tl.sum(score, axis=0) + 1e-20) * SCALE
    tl.store(w_out_ptr + tok * K + slot, gates, mask=ok)
    tl.store(id_out_ptr + tok * K + slot, expert, mask=ok)


def route_hash(logits: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, *, routed_scaling_factor: float = 1.0):
    """moe.route_hash: (gates [N, k] fp32, experts [N, k] int64) with experts = table[ids] (table [V, k]) and
    gates their sqrt(softplus(logits)) scores renormalised (+1e-20) and scaled. ids must index the table's rows
    (the embedding read them first)."""
    check_device("moe.route_hash", logits)
    if logits.dim() != 2 or table.dim() != 2 or ids.shape != (logits.shape[0],):
        raise ShapeError(f"moe.route_hash: logits [N, E], tid2eid [V, k], ids [N]; got {tuple(logits.shape)}, "
                         f"{tuple(table.shape)}, {tuple(ids.shape)}")
    n, k = logits.shape[0], table.shape[1]
    weights = torch.empty((n, k), dtype=torch.float32, device=logits.device)
    experts = torch.empty((n, k), dtype=torch.int64, device=logits.device)
    if n:
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        table = table if table.stride(-1) == 1 else table.contiguous()
        _hash_route_kernel[(n,)](logits, table, ids.contiguous(), weights, experts, logits.stride(0),
                                 table.stride(0), K=k, BLOCK_K=_pow2(k), SCALE=float(routed_scaling_factor),
                                 num_warps=1)
    return weights, experts
