"""DeepSeek-V4 attention kernels (ops in dsgraph/ops/v4_attn.py): the sliding-window + compressed + sink attention
(`attention.sink`) and the compressor's pooling (`v4.compress`).

Sink attention: K = V is one latent head shared by every query head (MQA), so one program takes BLOCK_H heads of
one query and loads each [BLOCK_N, D] row tile once for all of them, as keys and as values. A query at position p
reads, as one online softmax (base 2, fp32):
  * its window: rows of kv = concat(state, new) at positions p - window < t <= p (kv row r is at position
    positions[b, 0] - (N - S) + r), a contiguous row range computed per program, so no row outside it is read;
  * dense compressed entries (HCA, no indices): the compact entries 0 .. (p + 1) // ratio - 1, those whose group
    ends at or before p, a contiguous row range;
  * indexed compressed entries (CSA): the entries of indices[b, s] (distinct, as indexer.topk's are; -1 = empty),
    each still checked to end its group ((j + 1) * ratio - 1) at or before p;
  * the per-head sink: a key with logit sinks[h] and value 0, i.e. the online softmax starts at (m, l) =
    (sink, 1) instead of (-inf, 0), so it lands in the denominator only.
Split-KV (flash-decoding, what fills the GPU at batch 1): each of NUM_SPLITS programs takes a share of the window
rows and of the compressed entries and writes a normalised partial output and its log-sum-exp; split 0 carries
the sink. mla_decode's `_mla_reduce_kernel` merges them (same partial layout). Prefill (S > 1) and decode (S = 1)
are the same launch: the work is O(S * (window + entries)), never O(S * T).

Compressor: one program per (completed group, BLOCK_C output columns) reads the window of R + 1 rows ending at the
group's last token i from concat(state, new) in place (state rows for the first R - i), adds the position bias,
softmaxes the gate over the window per column and pools kv with it; CSA's overlap reads the first ratio rows'
first halves and the last ratio rows' second halves. Only the groups a step completes are computed and stored
(the compact layout: dsgraph/ops/v4_attn.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dsgraph.errors import InputError, ShapeError
from dsgraph.ops.v4_attn import group_ends

from .common import check_device, check_float, dot_precision
from .flash_attention import LOG2E
from .mla_decode import REDUCE_SLICE, _mla_reduce_kernel


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


@triton.jit
def _attend(acc, l_i, m_i, q, kv_ptrs, ok, d_ok, qk_scale, PRECISION: tl.constexpr):
    """One online-softmax step (base 2) over the [BLOCK_N, BLOCK_D] rows at kv_ptrs that are `ok` (K = V)."""
    kv = tl.load(kv_ptrs, mask=ok[:, None] & d_ok[None, :], other=0.0)
    qk = tl.dot(q, tl.trans(kv), input_precision=PRECISION) * qk_scale
    qk = tl.where(ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a split's rows with nothing seen yet stay at zero
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _share(n, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """[start, end) of split `split`'s share of n items, in whole BLOCK_N tiles."""
    chunk = tl.cdiv(tl.cdiv(n, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    return start, tl.minimum(start + chunk, n)


@triton.jit
def _sink_attention_kernel(
    q_ptr, kv_ptr, sink_ptr, pos_ptr, c_ptr, idx_ptr, out_ptr, po_ptr, plse_ptr,
    S, H, N, T, K, window, ratio,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_pb, stride_ps,
    stride_cb, stride_ct, stride_cd,
    stride_ib, stride_is, stride_ik,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_xb, stride_xm, stride_xs,
    qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    COMP: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    n_hb = tl.cdiv(H, BLOCK_H)
    row = tl.program_id(0) // n_hb
    offs_h = (tl.program_id(0) % n_hb) * BLOCK_H + tl.arange(0, BLOCK_H)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    h_ok, d_ok = offs_h < H, offs_d < HEAD_D
    q = tl.load(q_ptr + b * stride_qb + row * stride_qs + offs_h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    p = tl.load(pos_ptr + b * stride_pb + row * stride_ps).to(tl.int32)
    base = tl.load(pos_ptr + b * stride_pb).to(tl.int32) - (N - S)      # the position of kv row 0
    sink = tl.load(sink_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32) * 1.4426950408889634   # log2(e)
    first = split == 0
    m_i = tl.where(first, sink, float("-inf"))
    l_i = tl.where(first, 1.0, 0.0) + tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    lo = tl.maximum(tl.maximum(p - window + 1, 0) - base, 0)              # the window's kv rows [lo, hi)
    hi = tl.minimum(p - base + 1, N)
    start, end = _share(tl.maximum(hi - lo, 0), split, NUM_SPLITS, BLOCK_N)
    kv_rows = kv_ptr + b * stride_kb + offs_d[None, :] * stride_kd
    for n0 in range(lo + start, lo + end, BLOCK_N):
        rows = n0 + offs_n
        ok = rows < lo + end
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, kv_rows + rows.to(tl.int64)[:, None] * stride_kn, ok, d_ok,
                                qk_scale, PRECISION)

    c_rows = c_ptr + b * stride_cb + offs_d[None, :] * stride_cd
    if COMP == 1:    # dense (HCA): every entry whose group ends at or before p
        start, end = _share(tl.minimum(tl.maximum(p + 1, 0) // ratio, T), split, NUM_SPLITS, BLOCK_N)
        for j0 in range(start, end, BLOCK_N):
            j = j0 + offs_n
            ok = j < end
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, c_rows + j.to(tl.int64)[:, None] * stride_ct, ok, d_ok,
                                    qk_scale, PRECISION)
    if COMP == 2:    # indexed (CSA): the selected slots
        start, end = _share(K, split, NUM_SPLITS, BLOCK_N)
        idx_row = idx_ptr + b * stride_ib + row * stride_is
        for k0 in range(start, end, BLOCK_N):
            k = k0 + offs_n
            idx = tl.load(idx_row + k * stride_ik, mask=k < end, other=-1).to(tl.int32)
            ok = (idx >= 0) & (idx < T) & ((idx + 1) * ratio <= p + 1)
            slot = tl.where(ok, idx, 0)
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, c_rows + slot.to(tl.int64)[:, None] * stride_ct, ok, d_ok,
                                    qk_scale, PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    mask = h_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + b * stride_ob + row * stride_os + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:            # mla_decode's partial layout: query row m = s * H + h, [B, M, splits] of D-wide rows
        part = b * stride_xb + (row * H + offs_h) * stride_xm + split * stride_xs
        tl.store(po_ptr + part[:, None] * HEAD_D + offs_d[None, :], out, mask=mask)
        tl.store(plse_ptr + part, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)), mask=h_ok)


def sink_launch(b: int, s: int, h: int, rows: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_H, split-KV partitions) by default. 64 heads a program share each row tile; where that leaves the
    GPU under 0.8 of a wave but half the heads a program would fill it, 32 (the second head block reads the rows
    from L2, cheaper than partial outputs); else partitions for about two waves, each at least 64 rows (none where
    the programs fill the GPU: the fp32 partials would cost more than idle SMs, as in mla_decode)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    block_h = min(64, _pow2(h))
    programs = b * s * triton.cdiv(h, block_h)
    if programs < 0.8 * sms <= 2 * programs and block_h == 64:
        return 32, 1
    if programs >= 0.8 * sms:
        return block_h, 1
    return block_h, max(1, min(2 * sms // programs, rows // 64, 64))


def sink_attention(q: torch.Tensor, kv: torch.Tensor, sinks: torch.Tensor, positions: torch.Tensor, window: int,
                   scale: float, comp: torch.Tensor | None = None, indices: torch.Tensor | None = None,
                   ratio: int = 0, num_splits: int | None = None, block_h: int | None = None) -> torch.Tensor:
    """attention.sink: q [B,S,H,D], kv [B,W-1+S,D] (state then new rows), sinks [H], positions int [B,S], comp
    [B,N,D] (compact entries) and indices int [B,S,K] optional -> [B,S,H,D] in q's dtype (module docstring).
    num_splits, block_h (a power of two >= 16): the launch (default: sink_launch's)."""
    dtype = check_float("sink_attention", q=q, kv=kv, **({} if comp is None else {"comp": comp}))
    b, s, h, d = q.shape
    n = kv.shape[1]
    if kv.shape != (b, n, d) or n < s or sinks.shape != (h,) or positions.shape != (b, s) \
            or comp is not None and (comp.dim() != 3 or comp.shape[0] != b or comp.shape[2] != d):
        raise ShapeError(f"sink_attention: q {tuple(q.shape)}, kv {tuple(kv.shape)}, sinks {tuple(sinks.shape)}, "
                         f"positions {tuple(positions.shape)}" + ("" if comp is None else f", comp "
                         f"{tuple(comp.shape)}") + " must be [B,S,H,D], [B,W-1+S,D], [H], [B,S], [B,T,D]")
    if indices is not None and (comp is None or indices.dim() != 3 or indices.shape[:2] != (b, s)
                                or indices.is_floating_point()):
        raise ShapeError(f"sink_attention: indices {tuple(indices.shape)} must be int [B,S,K] = [{b},{s},K] and "
                         "come with comp")
    if comp is not None and ratio <= 0 or window <= 0:
        raise InputError(f"sink_attention: window {window} and (with comp) ratio {ratio} must be positive")
    t = 0 if comp is None else comp.shape[1]
    k = 0 if indices is None else indices.shape[2]
    out = torch.empty_like(q)
    if not out.numel():
        return out
    rows = min(n, window) + (k if indices is not None else t)
    auto_h, auto_splits = sink_launch(b, s, h, rows, q.device)
    block_h, splits = block_h or auto_h, num_splits or auto_splits
    if block_h < 16 or block_h & (block_h - 1):
        raise InputError(f"sink_attention: block_h {block_h} must be a power of two >= 16")
    programs = s * triton.cdiv(h, block_h)
    if splits > 1:
        po = torch.empty((b, s * h, splits, d), dtype=torch.float32, device=q.device)
        plse = torch.empty((b, s * h, splits), dtype=torch.float32, device=q.device)
    else:
        po = plse = out   # unused: the kernel writes `out` directly
    p_strides = (s * h * splits, splits, 1)
    cc = kv if comp is None else comp
    ii = positions if indices is None else indices
    block_d = _pow2(d)
    _sink_attention_kernel[(programs, b, splits)](
        q, kv, sinks, positions, cc, ii, out, po, plse, s, h, n, t, k, window, max(ratio, 1),
        *q.stride(), *kv.stride(), *positions.stride(), *cc.stride(),
        *(ii.stride() if indices is not None else (0, 0, 0)), *out.stride(), *p_strides, scale * LOG2E,
        HEAD_D=d, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_N=32 if d > 256 else 64,
        COMP=0 if comp is None else 2 if indices is not None else 1, NUM_SPLITS=splits, PRECISION=dot_precision(dtype),
        num_warps=8 if block_h * block_d >= 16384 else 4)   # as sink_attention_shared_bytes compiles it
    if splits > 1:
        slice_d = min(block_d, REDUCE_SLICE)
        _mla_reduce_kernel[(s * h, b, triton.cdiv(d, slice_d))](
            po, plse, out, h, *p_strides, *out.stride(), HEAD_C=d, BLOCK_C=slice_d, NUM_SPLITS=splits,
            BLOCK_SPLITS=triton.next_power_of_2(splits), num_warps=4 if slice_d * splits >= 4096 else 1)
    return out


@triton.jit
def _compress_kernel(
    kv_ptr, gate_ptr, st_ptr, bias_ptr, pos_ptr, out_ptr, R, C, ratio, first,
    stride_kb, stride_ks, stride_kc,
    stride_gb, stride_gs, stride_gc,
    stride_sb, stride_sr, stride_sc,
    stride_br, stride_bc,
    stride_pb, stride_ps,
    stride_ob, stride_os, stride_oc,
    D: tl.constexpr, OVERLAP: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    i = first + tl.program_id(0) * ratio                           # the token ending group program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)    # output columns
    j = tl.arange(0, BLOCK_W)                                       # window row j: concat(state, new) row i + j
    e = i + j
    w_ok = j < R + 1
    in_state = (e < R) & w_ok
    in_new = (e >= R) & w_ok
    col = offs_c[None, :]
    if OVERLAP:     # the previous group's first halves, then this group's second halves
        col = col + tl.where(j >= ratio, D, 0)[:, None]
    c_ok = (offs_c < D)[None, :]
    p0 = tl.load(pos_ptr + b * stride_pb)
    pos = tl.where(in_state, p0 - R + e, tl.load(pos_ptr + b * stride_pb + (e - R) * stride_ps, mask=in_new, other=-1))
    st = st_ptr + b * stride_sb + e[:, None] * stride_sr
    new = (e - R)[:, None]
    kv = tl.where(in_state[:, None], tl.load(st + col * stride_sc, mask=in_state[:, None] & c_ok, other=0.0),
                  tl.load(kv_ptr + b * stride_kb + new * stride_ks + col * stride_kc, mask=in_new[:, None] & c_ok,
                          other=0.0)).to(tl.float32)
    g = tl.where(in_state[:, None], tl.load(st + (C + col) * stride_sc, mask=in_state[:, None] & c_ok, other=0.0),
                 tl.load(gate_ptr + b * stride_gb + new * stride_gs + col * stride_gc, mask=in_new[:, None] & c_ok,
                         other=0.0)).to(tl.float32)
    valid = w_ok & (pos >= 0)
    g += tl.load(bias_ptr + (tl.where(valid, pos, 0) % ratio)[:, None] * stride_br + col * stride_bc,
                 mask=valid[:, None] & c_ok, other=0.0)
    g = tl.where(valid[:, None], g, float("-inf"))
    w = tl.exp(g - tl.max(g, 0)[None, :])          # the token's own row is valid: no all -inf column
    pooled = tl.sum(kv * w, 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * stride_ob + tl.program_id(0) * stride_os + offs_c * stride_oc,
             pooled.to(out_ptr.dtype.element_ty), mask=offs_c < D)


def compress(kv: torch.Tensor, gate: torch.Tensor, state: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor,
             past: int, ratio: int, overlap: bool = False,
             candidate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """v4.compress: kv, gate [B,S,C] at positions past.. (int [B,S], every row starting at `past`, the tokens
    before them), state [B,R,2C] (R = ratio - 1, or 2 * ratio - 1 with overlap), bias [ratio, C] -> (entries
    [B,N,D] in kv's dtype, D = C (C / 2 with overlap), their first positions int64 [B,N]) for the N groups the
    step completes; module docstring. `candidate` (a static-capacity step of one token, whose `past` is the
    buffer's, not the token count): the one entry [B,1,D] pooling the window that ends at the token, the group's
    entry when it completes one (and never read otherwise)."""
    for name, x in (("kv", kv), ("gate", gate), ("state", state), ("bias", bias)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.device != kv.device:
            raise InputError(f"compress: {name} must be a float tensor on {kv.device}")
    check_device("compress", kv)
    b, s, c = kv.shape
    r = (2 if overlap else 1) * ratio - 1
    if ratio <= 0 or gate.shape != kv.shape or state.shape != (b, r, 2 * c) or bias.shape != (ratio, c) \
            or positions.shape != (b, s) or positions.is_floating_point() or overlap and c % 2:
        raise ShapeError(f"compress: kv {tuple(kv.shape)}, gate {tuple(gate.shape)}, state {tuple(state.shape)}, "
                         f"bias {tuple(bias.shape)}, positions {tuple(positions.shape)} must be [B,S,C], [B,S,C], "
                         f"[B,{r},2C], [{ratio},C], int [B,S] (ratio {ratio} > 0; even C with overlap)")
    d = c // 2 if overlap else c
    if candidate and s != 1:
        raise ShapeError(f"compress: a candidate entry is one token's, got kv {tuple(kv.shape)}")
    ends = range(0, 1) if candidate else group_ends(past, s, ratio)
    out = torch.empty((b, len(ends), d), dtype=kv.dtype, device=kv.device)
    if out.numel():
        block_c = min(64, _pow2(d))
        _compress_kernel[(len(ends), b, triton.cdiv(d, block_c))](
            kv, gate, state, bias, positions, out, r, c, ratio, ends.start, *kv.stride(), *gate.stride(),
            *state.stride(), *bias.stride(), *positions.stride(), *out.stride(), D=d, OVERLAP=overlap,
            BLOCK_W=triton.next_power_of_2(r + 1), BLOCK_C=block_c)
    if candidate:
        return out, positions - (ratio - 1)
    starts = (past // ratio + torch.arange(len(ends), device=kv.device)) * ratio
    return out, starts.expand(b, -1)


def sink_attention_shared_bytes(comp: int = 2, splits: int = 4, block_h: int = 64, d: int = 512) -> int:
    """Shared memory of sink_attention's bf16 launch at V4-Flash's width (default: top-k entries, split-KV),
    compiled for sm_90 without a GPU (not under the interpreter, whose kernels are not JIT functions)."""
    consts = {"HEAD_D": d, "BLOCK_D": _pow2(d), "BLOCK_H": block_h, "BLOCK_N": 32 if d > 256 else 64, "COMP": comp,
              "NUM_SPLITS": splits, "PRECISION": "tf32"}
    ptrs = {"sink_ptr": "*fp32", "pos_ptr": "*i64", "idx_ptr": "*i64", "po_ptr": "*fp32", "plse_ptr": "*fp32"}
    names = _sink_attention_kernel.arg_names
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "*bf16") if a.endswith("_ptr") else
           "fp32" if a == "qk_scale" else "i32" for a in names}
    src = ASTSource(_sink_attention_kernel, sig, constexprs={(names.index(a),): v for a, v in consts.items()})
    warps = 8 if block_h * _pow2(d) >= 16384 else 4
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).metadata.shared
