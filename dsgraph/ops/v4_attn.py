"""DeepSeek-V4 attention ops: the compressor's pooling, the sliding state, attention over window + compressed
entries with a per-head sink, the compressed-slot mask of the CSA indexer, and the grouped output projection.

Semantics as transformers' `modeling_deepseek_v4.py` defines them (paper §2.3). The functional-cache layout:
  * the sliding window is a fixed-size state [B, W-1, D] of the last W-1 K=V rows (`cache.slide`); attention
    reads concat(state, new) and masks by absolute position, so state rows before position 0 are never read;
  * the compressor's running state is a fixed-size [B, R, 2C] of the last R raw (kv | gate) projection rows
    (R = ratio - 1 for HCA, 2 * ratio - 1 for CSA's overlapping windows): the partial group not yet pooled;
  * compressed entries (and the CSA indexer's keys) are compact, as the reference keeps them: after T tokens a
    [B, T//ratio, D] cache holds one entry per complete group, entry j pooling the window that ends at position
    (j + 1) * ratio - 1; a step of S tokens appends the (T+S)//ratio - T//ratio groups it completes. The entry
    count depends on T, not only on the compact cache's length, so `v4.compress` reads T from the shape of
    `past` (the builder's token-count cache, [B, T, 0]); every row of a batch is at the same length T.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from ..symbolic import floordiv
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
COMPRESS = defop("v4.compress", "kv gate state bias positions past",
                 {"ratio": Attr(int), "overlap": Attr(bool, False)},
                 "V4 compressor pooling (pre-norm): new kv / gate projections [B,S,C] at positions T..T+S-1 "
                 "(T = past.shape[1]), the state [B,R,2C] of the last R raw (kv|gate) rows, position bias "
                 "[ratio,C] -> (entries [B,N,D], their groups' first positions int64 [B,N]) for the N = "
                 "(T+S)//ratio - T//ratio groups the step completes: the softmax(gate + bias)-weighted sum over "
                 "the window ending at the group's last token. overlap (CSA): D = C/2; an entry pools the "
                 "previous window's first halves and its own second halves (width 2*ratio, stride ratio); "
                 "R = 2*ratio-1, else R = ratio-1 and D = C.", num_outputs=2, level="domain")


def compress_rows(ratio: int, overlap: bool) -> int:
    return (2 if overlap else 1) * ratio - 1


def completed(t, s, ratio: int):
    """The groups of `ratio` tokens that tokens t..t+s-1 complete (ints or dims)."""
    return floordiv(t + s, ratio) - floordiv(t, ratio)


@COMPRESS.infer
def _(kv, gate, state, bias, positions, past, ratio, overlap=False):
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
    expect(past.rank >= 2 and past.shape[0] == kv.shape[0],
           lambda: f"v4.compress: past {past} must be [B, T, ...] (T: the tokens before this step) for kv {kv}")
    n = completed(past.shape[1], kv.shape[1], ratio)
    return TensorType((kv.shape[0], n, c // 2 if overlap else c), kv.dtype), TensorType((kv.shape[0], n), "int64")


def group_ends(t: int, s: int, ratio: int) -> range:
    """The rows of a step of s tokens at positions t.. that end a group (the tokens at (j + 1) * ratio - 1)."""
    return range(ratio - 1 - t % ratio, s, ratio)


def check_start(positions, t: int, what: str) -> None:
    if positions.numel() and (positions[:, 0] != t).any():
        raise InputError(f"{what}: positions must start at T = {t} (the tokens before this step) in every row, "
                         f"got {positions[:, 0].tolist()}: the compact compressed cache has one length per batch")


@COMPRESS.reference
def _(kv, gate, state, bias, positions, past, ratio, overlap=False):
    b, s, c = kv.shape
    r, t = state.shape[1], past.shape[1]
    check_start(positions, t, "v4.compress")
    ext_kv = torch.cat((f32(state[..., :c]), f32(kv)), 1)                      # [B, R+S, C]
    ext_pos = torch.cat((positions[:, :1] - r + torch.arange(r, device=kv.device), positions), 1)
    ext_gate = torch.cat((f32(state[..., c:]), f32(gate)), 1) + f32(bias)[ext_pos % ratio]
    ext_gate = ext_gate.masked_fill((ext_pos < 0)[..., None], float("-inf"))
    ends = torch.tensor(group_ends(t, s, ratio), dtype=torch.long, device=kv.device)
    win_kv = ext_kv.unfold(1, r + 1, 1).transpose(-1, -2)[:, ends]            # [B, N, R+1, C]: rows ending there
    win_gate = ext_gate.unfold(1, r + 1, 1).transpose(-1, -2)[:, ends]
    if overlap:
        d = c // 2
        win_kv = torch.cat((win_kv[:, :, :ratio, :d], win_kv[:, :, ratio:, d:]), 2)
        win_gate = torch.cat((win_gate[:, :, :ratio, :d], win_gate[:, :, ratio:, d:]), 2)
    pooled = (win_kv * torch.softmax(win_gate, dim=2)).sum(2)
    starts = (t // ratio + torch.arange(len(ends), device=kv.device)) * ratio
    return pooled.to(kv.dtype), starts.expand(b, -1).contiguous()


# ---------------------------------------------------------------- attention: window + compressed + sink
SINK_ATTRS = {"window": Attr(int), "ratio": Attr(int, 0), "scale": Attr(float)}
SINK = defop("attention.sink", "q kv sinks positions comp? indices?", SINK_ATTRS,
             "V4 shared-KV attention: q [B,S,H,D] over kv [B,W-1+S,D] (sliding state then the new rows; the "
             "query at p sees positions p-window < t <= p) and compact compressed entries comp [B,N,D], entry j "
             "(the group ending at position (j+1)*ratio-1) seen from p >= (j+1)*ratio-1 (only those in indices "
             "[B,S,K] when given; -1 = empty); K = V; "
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
    """bool [B,S,T]: compact entries a query may read (group ends at or before it; selected when indexed)."""
    entry = torch.arange(t, device=positions.device)
    keep = (entry[None, None, :] + 1) * ratio <= positions[:, :, None] + 1
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
SLOT_MASK = defop("indexer.slot_mask", "logits positions", {"ratio": Attr(int)},
                  "fp32 logits [B,S,N] over compact compressed entries, -inf at the entries j a query at "
                  "positions[b,s] = p cannot see yet (its group ends later: (j+1)*ratio - 1 > p).", level="domain")


@SLOT_MASK.infer
def _(logits, positions, ratio):
    expect_rank(logits, 3, "indexer.slot_mask logits [B,S,N]")
    expect_int(positions, "indexer.slot_mask positions")
    expect(positions.shape == logits.shape[:2], lambda: f"indexer.slot_mask: positions {positions} must be [B,S] "
           f"of logits {logits}")
    expect(ratio > 0, f"indexer.slot_mask: ratio {ratio} must be positive")
    return logits.with_dtype("float32")


@SLOT_MASK.reference
def _(logits, positions, ratio):
    return f32(logits).masked_fill(~slot_keep(positions, logits.shape[-1], ratio), float("-inf"))


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
