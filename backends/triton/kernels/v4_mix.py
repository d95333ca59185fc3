"""DeepSeek-V4's mHC hyper-connections and hash routing as one launch each (ops hc.pre, hc.post, hc.head,
moe.route_hash; semantics in dsgraph/ops/v4_mix.py).

`_hc_mix_kernel`, one program per MIX_TOKENS tokens: pass 1 streams their N*D stream values and the fp32
projection fn in BLOCK chunks (each fn chunk read once for all of them), accumulating the sums of squares and the
raw projections (the unweighted RMSNorm is a per-token scalar, so it multiplies the dot products afterwards); the
weights follow in registers — pre = sigmoid(.)+eps, and for hc.pre post = 2*sigmoid(.) and comb =
Sinkhorn(softmax(.)+eps) with every one of the `iters` row/column normalisations on [tokens, N, N] register
tiles (padded lanes held at 0 so they add nothing); pass 2 re-reads x in D chunks for the weighted merge
sum_n pre[n] x[n]. hc.head is the same kernel without post/comb.
`_hc_post_kernel`: out[n] = post[n] * y + sum_j comb[j, n] x[j], one program per (MIX_TOKENS tokens, chunk of
the flattened (n, d) outputs).
At decode (a few tokens) one program streams the whole fn (24 x N*D fp32), which is one SM's bandwidth.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsgraph.errors import ShapeError

from .common import check_device, interpreting
from .routing import sqrt_softplus


@triton.jit
def _hc_mix_kernel(x_ptr, fn_ptr, base_ptr, scale_ptr, out_ptr, post_ptr, comb_ptr, T, stride_x,
                   N: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_D: tl.constexpr, FULL: tl.constexpr, ITERS: tl.constexpr, EPS: tl.constexpr,
                   NORM_EPS: tl.constexpr):
    ND: tl.constexpr = N * D
    K2: tl.constexpr = BN * BN
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    t_ok = t < T
    row = t.to(tl.int64) * stride_x
    i = tl.arange(0, BN)
    ok = i < N
    k = tl.arange(0, K2)  # comb[ci, cj] flattened row-major over the padded BN x BN tile
    ci, cj = k // BN, k % BN
    k_ok = (ci < N) & (cj < N)
    ss = tl.zeros((BT,), dtype=tl.float32)
    pre_acc = tl.zeros((BT, BN), dtype=tl.float32)
    post_acc = tl.zeros((BT, BN), dtype=tl.float32)
    comb_acc = tl.zeros((BT, K2), dtype=tl.float32)
    for c0 in range(0, ND, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        c_ok = c < ND
        xv = tl.load(x_ptr + row[:, None] + c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        xv = xv.to(tl.float32)[:, None, :]
        ss += tl.sum(tl.sum(xv * xv, axis=2), axis=1)
        w = tl.load(fn_ptr + i[:, None] * ND + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
        pre_acc += tl.sum(xv * w[None, :, :], axis=2)
        if FULL:
            w = tl.load(fn_ptr + (N + i[:, None]) * ND + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
            post_acc += tl.sum(xv * w[None, :, :], axis=2)
            w = tl.load(fn_ptr + (2 * N + ci[:, None] * N + cj[:, None]) * ND + c[None, :],
                        mask=k_ok[:, None] & c_ok[None, :], other=0.0)
            comb_acc += tl.sum(xv * w[None, :, :], axis=2)
    inv_rms = tl.rsqrt(ss / ND + NORM_EPS)[:, None]
    pre = tl.sigmoid(pre_acc * inv_rms * tl.load(scale_ptr) + tl.load(base_ptr + i, mask=ok, other=0.0)[None, :])
    pre = tl.where(ok[None, :], pre + EPS, 0.0)
    if FULL:
        post = 2.0 * tl.sigmoid(post_acc * inv_rms * tl.load(scale_ptr + 1)
                                + tl.load(base_ptr + N + i, mask=ok, other=0.0)[None, :])
        tl.store(post_ptr + t[:, None] * N + i[None, :], post, mask=t_ok[:, None] & ok[None, :])
        cell = (i[:, None] < N) & (i[None, :] < N)  # [BN, BN], broadcast over the tokens
        bias = tl.load(base_ptr + 2 * N + i[:, None] * N + i[None, :], mask=cell, other=0.0)
        logit = tl.reshape(comb_acc * inv_rms, (BT, BN, BN)) * tl.load(scale_ptr + 2) + bias[None, :, :]
        logit = tl.where(cell[None, :, :], logit, float("-inf"))
        top = tl.where(ok[None, :], tl.max(logit, axis=2), 0.0)
        p = tl.where(cell[None, :, :], tl.exp(logit - top[:, :, None]), 0.0)
        total = tl.where(ok[None, :], tl.sum(p, axis=2), 1.0)  # padded rows: no 0 / 0
        comb = tl.where(cell[None, :, :], p / total[:, :, None] + EPS, 0.0)
        comb = comb / (tl.sum(comb, axis=1)[:, None, :] + EPS)
        for _ in range(ITERS - 1):
            comb = comb / (tl.sum(comb, axis=2)[:, :, None] + EPS)
            comb = comb / (tl.sum(comb, axis=1)[:, None, :] + EPS)
        where = t[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :]
        tl.store(comb_ptr + where, comb, mask=t_ok[:, None, None] & cell[None, :, :])
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        xv = tl.load(x_ptr + row[:, None, None] + i[None, :, None] * D + d[None, None, :],
                     mask=t_ok[:, None, None] & ok[None, :, None] & d_ok[None, None, :], other=0.0)
        merged = tl.sum(pre[:, :, None] * xv.to(tl.float32), axis=1)
        tl.store(out_ptr + t[:, None] * D + d[None, :], merged.to(out_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _hc_post_kernel(x_ptr, y_ptr, post_ptr, comb_ptr, out_ptr, T, stride_x, stride_y,
                    N: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (target stream n, d) flattened
    n, d = col // D, col % D
    m = (t < T)[:, None] & (col < N * D)[None, :]
    t64 = t.to(tl.int64)[:, None]
    yv = tl.load(y_ptr + t64 * stride_y + d[None, :], mask=m, other=0.0).to(tl.float32)
    out = tl.load(post_ptr + t64 * N + n[None, :], mask=m, other=0.0).to(tl.float32) * yv
    for j in tl.static_range(N):  # + sum_j comb[j, n] x[j, d]
        cw = tl.load(comb_ptr + t64 * (N * N) + j * N + n[None, :], mask=m, other=0.0).to(tl.float32)
        out += cw * tl.load(x_ptr + t64 * stride_x + j * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t64 * (N * D) + col[None, :], out.to(out_ptr.dtype.element_ty), mask=m)


MIX_TOKENS = 16  # tokens a mix program takes: each fn chunk loaded once serves them all (prefill)


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
    post = torch.empty((*lead, n), dtype=torch.float32, device=x.device) if full else out  # hc.head: unused
    comb = torch.empty((*lead, n, n), dtype=torch.float32, device=x.device) if full else out
    tokens = x2.shape[0]
    if tokens:
        bn = _pow2(n)
        bt = min(_pow2(tokens), MIX_TOKENS)
        room = 1 << 16 if interpreting() else 4096   # elements a [BT, N*N, BLOCK] tile may hold (registers)
        block = min(_pow2(n * d), max(16, room // (bt * bn * bn)))
        _hc_mix_kernel[(triton.cdiv(tokens, bt),)](
            x2, fn, base, scale, out, post, comb, tokens, x2.stride(0), N=n, D=d, BN=bn, BT=bt, BLOCK=block,
            BLOCK_D=min(_pow2(d), max(16, room // (bt * bn))), FULL=full, ITERS=iters, EPS=float(eps),
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
    tokens = x2.shape[0]
    if tokens:
        bt = min(_pow2(tokens), MIX_TOKENS)
        block = min(_pow2(n * d), max(64, 4096 // bt))
        _hc_post_kernel[(triton.cdiv(tokens, bt), triton.cdiv(n * d, block))](
            x2, y2, post, comb, out, tokens, x2.stride(0), y2.stride(0), N=n, D=d, BT=bt, BLOCK=block, num_warps=4)
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
