"""DeepSeek-V4 attention ops: the compressor's pooling, the sliding state, attention over window + compressed
entries with a per-head sink, the compressed-slot mask of the CSA indexer, and the grouped output projection.

Semantics as transformers' `modeling_deepseek_v4.py` defines them (paper §2.3). The functional-cache layout:
  * the sliding window is a fixed-size state [B, W-1, D] of the last W-1 K=V rows (`cache.slide`); attention
    reads concat(state, new) and masks by absolute position, so state rows before position 0 are never read;
  * the compressor's running state is a fixed-size [B, R, 2C] of the last R raw (kv | gate) projection rows
    (R = ratio - 1 for HCA, 2 * ratio - 1 for CSA's overlapping windows): the partial group not yet pooled;
  * compressed entries (and the CSA indexer's keys) are appended per token *slot*: the entry of the window
    ending at position t lives at row t of a [B, T, D] cache; rows t with (t + 1) % ratio != 0 hold zeros and
    are never attended. This keeps every shape symbolic in T (the IR has no floor division) at the price of
    ratio-times the entry memory; a compact layout is a cache-layout rewrite left for later.
"""
from __future__ import annotations

import torch

from ..types import TensorType
from .common import expect_float, expect_int, expect_rank, f32, same_dtype
from .registry import Attr, defop, expect

SLIDE = defop("cache.slide", "state new", {},
              "Fixed-size sliding state: the last R rows (R = state.shape[1]) of concat(state, new) along dim 1.",
              level="domain")


@SLIDE.infer
def _(state, new):
    expect(state.rank == new.rank and state.rank >= 2 and state.shape[0] == new.shape[0]
           and state.shape[2:] == new.shape[2:], lambda: f"cache.slide: state {state} and new rows {new} differ")
    same_dtype(state, new)
    return state


@SLIDE.reference
def _(state, new):
    r = state.shape[1]
    return torch.cat((state, new.to(state.dtype)), 1)[:, -r:] if r else state


@SLIDE.decomposition
def _(b, state, new):
    r = state.shape[1]
    return b.slice(b.concat(state, new, dim=1), dim=1, start=-r, end=None) if r else state


# ---------------------------------------------------------------- compressor pooling
COMPRESS = defop("v4.compress", "kv gate state bias positions", {"ratio": Attr(int), "overlap": Attr(bool, False)},
                 "V4 compressor pooling (pre-norm): new kv / gate projections [B,S,C], the state [B,R,2C] of the "
                 "last R raw (kv|gate) rows, position bias [ratio,C] -> [B,S,D] where row i is the softmax(gate + "
                 "bias)-weighted sum over the window ending at positions[b,i] when (pos+1) % ratio == 0, else 0. "
                 "overlap (CSA): D = C/2; an entry pools the previous window's first halves and its own second "
                 "halves (width 2*ratio, stride ratio); R = 2*ratio-1, else R = ratio-1 and D = C.", level="domain")


def compress_rows(ratio: int, overlap: bool) -> int:
    return (2 if overlap else 1) * ratio - 1


@COMPRESS.infer
def _(kv, gate, state, bias, positions, ratio, overlap=False):
    expect_rank(kv, 3, "v4.compress kv [B,S,C]")
    expect_float(kv, "v4.compress kv")
    expect_int(positions, "v4.compress positions")
    c = kv.shape[2]
    expect(gate.shape == kv.shape and positions.shape == kv.shape[:2],
           lambda: f"v4.compress: gate {gate} / positions {positions} must match kv {kv}")
    expect(state.shape == (kv.shape[0], compress_rows(ratio, overlap), 2 * c),
           lambda: f"v4.compress: state must be [B,{compress_rows(ratio, overlap)},{2 * c}], got {state}")
    expect(bias.shape == (ratio, c), lambda: f"v4.compress: position bias must be [{ratio},{c}], got {bias}")
    expect(not overlap or (isinstance(c, int) and c % 2 == 0), f"v4.compress: overlap needs an even width, {kv}")
    return TensorType(kv.shape[:2] + (c // 2 if overlap else c,), kv.dtype)


@COMPRESS.reference
def _(kv, gate, state, bias, positions, ratio, overlap=False):
    b, s, c = kv.shape
    r = state.shape[1]
    ext_kv = torch.cat((f32(state[..., :c]), f32(kv)), 1)                      # [B, R+S, C]
    ext_pos = torch.cat((positions[:, :1] - r + torch.arange(r, device=kv.device), positions), 1)
    ext_gate = torch.cat((f32(state[..., c:]), f32(gate)), 1) + f32(bias)[ext_pos % ratio]
    ext_gate = ext_gate.masked_fill((ext_pos < 0)[..., None], float("-inf"))
    win_kv = ext_kv.unfold(1, r + 1, 1).transpose(-1, -2)                      # [B, S, R+1, C]: rows ending at i
    win_gate = ext_gate.unfold(1, r + 1, 1).transpose(-1, -2)
    if overlap:
        d = c // 2
        win_kv = torch.cat((win_kv[:, :, :ratio, :d], win_kv[:, :, ratio:, d:]), 2)
        win_gate = torch.cat((win_gate[:, :, :ratio, :d], win_gate[:, :, ratio:, d:]), 2)
    pooled = (win_kv * torch.softmax(win_gate, dim=2)).sum(2)
    return torch.where(((positions + 1) % ratio == 0)[..., None], pooled, 0.0)


# ---------------------------------------------------------------- attention: window + compressed + sink
SINK_ATTRS = {"window": Attr(int), "ratio": Attr(int, 0), "scale": Attr(float)}
SINK = defop("attention.sink", "q kv sinks positions comp? indices?", SINK_ATTRS,
             "V4 shared-KV attention: q [B,S,H,D] over kv [B,W-1+S,D] (sliding state then the new rows; the "
             "query at p sees positions p-window < t <= p) and compressed entries comp [B,T,D] at slots t with "
             "(t+1) % ratio == 0 and t <= p (only those in indices [B,S,K] when given; -1 = empty); K = V; "
             "softmax with a per-head sink logit sinks [H] in the denominator; -> [B,S,H,D].", level="domain")


@SINK.infer
def _(q, kv, sinks, positions, comp=None, indices=None, *, window, ratio=0, scale):
    expect_rank(q, 4, "attention.sink q [B,S,H,D]")
    expect_rank(kv, 3, "attention.sink kv [B,W-1+S,D]")
    expect_float(q, "attention.sink q")
    same_dtype(q, kv)
    expect(kv.shape[0] == q.shape[0] and kv.shape[2] == q.shape[3],
           lambda: f"attention.sink: kv {kv} must be [B, *, {q.shape[3]}] for q {q}")
    expect(sinks.shape == (q.shape[2],), lambda: f"attention.sink: sinks must be [{q.shape[2]}], got {sinks}")
    expect(positions.shape == q.shape[:2], lambda: f"attention.sink: positions {positions} must be [B,S] of {q}")
    if comp is not None:
        expect(ratio > 0 and comp.rank == 3 and comp.shape[2] == q.shape[3],
               lambda: f"attention.sink: compressed entries {comp} need ratio > 0 and head dim {q.shape[3]}")
    if indices is not None:
        expect_int(indices, "attention.sink indices")
        expect(indices.rank == 3 and indices.shape[:2] == q.shape[:2],
               lambda: f"attention.sink: indices {indices} must be [B,S,K] of {q}")
    return q


def window_keep(positions, n_kv, window):
    """bool [B,S,n_kv]: which rows of concat(state, new) each query sees (kv row r is at p0 - (n_kv - S) + r)."""
    s = positions.shape[1]
    kpos = positions[:, :1] - (n_kv - s) + torch.arange(n_kv, device=positions.device)
    diff = positions[:, :, None] - kpos[:, None, :]
    return (kpos[:, None, :] >= 0) & (diff >= 0) & (diff < window)


def slot_keep(positions, t, ratio, indices=None):
    """bool [B,S,T]: compressed slots a query may read (window ends at or before it; selected when indexed)."""
    slot = torch.arange(t, device=positions.device)
    keep = ((slot + 1) % ratio == 0) & (slot[None, None, :] <= positions[:, :, None])
    if indices is not None:
        sel = torch.zeros(keep.shape[0], keep.shape[1], t + 1, dtype=torch.bool, device=keep.device)
        sel.scatter_(-1, torch.where(indices >= 0, indices, t).long(), True)
        keep &= sel[..., :t]
    return keep


@SINK.reference
def _(q, kv, sinks, positions, comp=None, indices=None, *, window, ratio=0, scale):
    keys, keep = f32(kv), window_keep(positions, kv.shape[1], window)
    if comp is not None:
        keys = torch.cat((keys, f32(comp)), 1)
        keep = torch.cat((keep, slot_keep(positions, comp.shape[1], ratio, indices)), -1)
    scores = torch.einsum("bshd,btd->bsht", f32(q), keys) * scale
    scores = scores.masked_fill(~keep[:, :, None, :], float("-inf"))
    sink = f32(sinks)[None, None, :, None].expand(*scores.shape[:3], 1)
    p = torch.softmax(torch.cat((scores, sink), -1), -1)[..., :-1]
    return torch.einsum("bsht,btd->bshd", p, keys)


# ---------------------------------------------------------------- the CSA indexer's slot mask
SLOT_MASK = defop("indexer.slot_mask", "logits", {"ratio": Attr(int)},
                  "-inf at the compressed slots t of logits [B,S,T] that end no window ((t+1) % ratio != 0).",
                  level="domain")


@SLOT_MASK.infer
def _(logits, ratio):
    expect_rank(logits, 3, "indexer.slot_mask logits [B,S,T]")
    expect(ratio > 0, f"indexer.slot_mask: ratio {ratio} must be positive")
    return logits


@SLOT_MASK.reference
def _(logits, ratio):
    ends = (torch.arange(logits.shape[-1], device=logits.device) + 1) % ratio == 0
    return f32(logits).masked_fill(~ends, float("-inf"))


# ---------------------------------------------------------------- grouped output projection
GROUPED = defop("linear.grouped", "x weight", {},
                "Block-diagonal linear: x [B,S,G,Din], weight [G*Dout, Din] -> [B,S,G,Dout], group g through "
                "rows g*Dout:(g+1)*Dout (V4's o_a_proj, the first half of its grouped low-rank output).",
                level="domain")


@GROUPED.infer
def _(x, w):
    expect(x.rank == 4 and w.rank == 2 and w.shape[1] == x.shape[-1],
           lambda: f"linear.grouped: weight {w} must be [G*Dout, {x.shape[-1]}] for x {x}")
    g, rows = x.shape[-2], w.shape[0]
    expect(isinstance(g, int) and isinstance(rows, int) and rows % g == 0,
           lambda: f"linear.grouped: {rows} weight rows do not split into {g} groups")
    same_dtype(x, w)
    return TensorType(x.shape[:-1] + (rows // g,), x.dtype)


@GROUPED.reference
def _(x, w):
    g = x.shape[-2]
    return torch.einsum("bsgi,goi->bsgo", f32(x), f32(w).reshape(g, -1, x.shape[-1]))


@GROUPED.decomposition
def _(b, x, w):
    g = x.shape[-2]
    return b.einsum(x, b.reshape(w, shape=(g, w.shape[0] // g, x.shape[-1])), equation="bsgi,goi->bsgo")
