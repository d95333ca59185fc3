"""Per-row top-k on the device (op `indexer.topk`, dsgraph/ops/dsa.py): the positions of the k largest finite
logits of each row, best first, ties to the lower position, `-1` in the slots past the row's finite logits -- the
op's reference exactly, without a sort of the whole row and without a host sync.

One program per row, in three phases:
1. Threshold: the logits map to int64 keys of the same order (the fp32 bits, negatives' magnitude bits flipped,
   -0.0 read as +0.0), and the k-th largest finite key is found by radix select, 8 bits a pass from the top (4
   passes over the row, each a 256-bin histogram of the keys that share the digits found so far), which also
   leaves how many keys equal to it are to be picked.
2. Selection in position order: every key above the threshold, and of those equal to it the first ones still to
   pick, each written to the next free slot (a running prefix sum).
3. Order: the k selected slots are read back as one block, sorted by (key descending, position ascending) in
   registers, and written best first.
NaN logits have no defined place (the reference's sort puts them first; here they order as huge keys).
With slot_ratio m > 0 the kernel applies DeepSeek-V4's `indexer.slot_mask` as it reads: a query at position p
sees the compact compressed entries j < (p + 1) // m (those whose group has ended), a prefix of its row, so the
entries past it are never read and the mask costs no pass of its own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsgraph.errors import InputError, ShapeError

from .common import check_device

_LOW32 = 0xFFFFFFFF


@triton.jit
def _keys(x):
    """fp32 -> int64 in [0, 2**32), ordered as the floats (-0.0 as +0.0); -inf maps below every finite value."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2147483648


@triton.jit
def _load_row(x_row, t, T, stride_xt):
    """fp32 logits at positions t (-inf past T)."""
    return tl.load(x_row + t * stride_xt, mask=t < T, other=float("-inf")).to(tl.float32)


@triton.jit
def _topk_kernel(x_ptr, pos_ptr, out_ptr, T, K, stride_xb, stride_xs, stride_xt, stride_pb, stride_ps,
                 stride_ob, stride_os, stride_ok, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                 SLOT_RATIO: tl.constexpr):
    row = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if SLOT_RATIO > 0:   # the entries this query sees: a prefix of the row
        T = tl.minimum(T, (tl.load(pos_ptr + b * stride_pb + row * stride_ps).to(tl.int32) + 1) // SLOT_RATIO)
    x_row = x_ptr + b * stride_xb + row * stride_xs
    o_row = out_ptr + b * stride_ob + row * stride_os
    lanes = tl.arange(0, BLOCK_T)
    bins = tl.arange(0, 256)
    thresh = tl.zeros([], dtype=tl.int64)   # the digits of the k-th largest key found so far
    picks = tl.zeros([], dtype=tl.int32)    # min(K, finite logits)
    want = tl.zeros([], dtype=tl.int32)     # how many keys at or below the prefix are still to pick
    for i in tl.static_range(4):            # phase 1: one 8-bit digit a pass, the highest first
        shift = 24 - 8 * i
        hist = tl.zeros([256], dtype=tl.int32)
        for t0 in range(0, T, BLOCK_T):
            x = _load_row(x_row, t0 + lanes, T, stride_xt)
            key = _keys(x)
            live = (x != float("-inf")) & ((key >> (shift + 8)) == thresh)
            hist += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=live)
        if i == 0:
            picks = tl.minimum(tl.sum(hist), K)
            want = picks
        at_or_above = tl.cumsum(hist, 0, reverse=True)      # keys of this prefix with digit >= d
        digit = tl.max(tl.where(at_or_above >= want, bins, 0))
        want -= tl.sum(tl.where(bins > digit, hist, 0))
        thresh = (thresh << 8) | digit.to(tl.int64)
    ties_taken = want
    written = tl.zeros([], dtype=tl.int32)
    ties_seen = tl.zeros([], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):        # phase 2: the selection, in position order
        x = _load_row(x_row, t0 + lanes, T, stride_xt)
        ok = x != float("-inf")
        key = _keys(x)
        tie = (ok & (key == thresh)).to(tl.int32)
        take = (ok & (key > thresh)) | ((tie > 0) & (ties_seen + tl.cumsum(tie, 0) - tie < ties_taken))
        take_i = take.to(tl.int32)
        slot = written + tl.cumsum(take_i, 0) - take_i
        tl.store(o_row + slot * stride_ok, (t0 + lanes).to(tl.int64), mask=take)
        written += tl.sum(take_i)
        ties_seen += tl.sum(tie)
    tl.debug_barrier()                     # phase 3 reads what other threads of this program wrote
    slots = tl.arange(0, BLOCK_K)
    filled = slots < picks
    pos = tl.load(o_row + slots * stride_ok, mask=filled, other=0)
    key = _keys(tl.load(x_row + pos * stride_xt, mask=filled, other=0.0).to(tl.float32))
    order = tl.where(filled, ((key - 2147483648) << 32) | (4294967295 - pos), -9223372036854775807 - 1)
    order = tl.sort(order, 0, descending=True)
    best = tl.where(filled, 4294967295 - (order & 4294967295), -1)
    tl.debug_barrier()
    tl.store(o_row + slots * stride_ok, best, mask=slots < K)


def topk(logits: torch.Tensor, k: int, slot_ratio: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B,S,T] (float) -> int64 [B,S,k]: indexer.topk, of indexer.slot_mask(logits, positions, slot_ratio)
    when slot_ratio > 0 (positions int [B,S]; module docstring)."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 3:
        raise InputError(f"topk: logits must be a float tensor [B,S,T], got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)} {tuple(getattr(logits, 'shape', ()))}")
    if k <= 0 or logits.shape[-1] > _LOW32 or slot_ratio < 0:
        raise ShapeError(f"topk: k={k} must be positive, T={logits.shape[-1]} below 2**32 and slot_ratio "
                         f"{slot_ratio} >= 0")
    check_device("topk", logits)
    b, s, t = logits.shape
    if slot_ratio and (positions is None or positions.shape != (b, s) or positions.is_floating_point()):
        raise ShapeError(f"topk: slot_ratio {slot_ratio} needs the queries' positions, int [{b},{s}], got "
                         f"{None if positions is None else (positions.dtype, tuple(positions.shape))}")
    pos = positions if slot_ratio else logits
    out = torch.empty((b, s, k), dtype=torch.int64, device=logits.device)
    if out.numel():
        _topk_kernel[(s, b)](logits, pos, out, t, k, *logits.stride(), *pos.stride()[:2], *out.stride(),
                             BLOCK_T=min(1024, triton.next_power_of_2(max(t, 16))),
                             BLOCK_K=triton.next_power_of_2(k), SLOT_RATIO=slot_ratio)
    return out
