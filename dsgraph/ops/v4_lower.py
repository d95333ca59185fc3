"""Decompositions of V4's position-indexed ops (v4_attn.py) into primitives, for backends without kernels
(TVM lowers them this way; the legalize pass uses them).

The primitive set has no integer modulo, so `p mod m` is `p - trunc(p / m) * m` over fp32: exact while the
quotient's fraction (>= 1/m) stays above its ulp, i.e. for positions below 2**22 (4M) at any m <= 128, past V4's
1M context.
"""
from __future__ import annotations

from ..symbolic import simplify
from .registry import expect
from .v4_attn import COMPRESS, SINK, SLOT_MASK, completed


def _and(b, x, y):
    """x and y for bool tensors, as a float sum (ONNX Runtime has no bool Where)."""
    return b.gt(b.add(b.cast(x, dtype="float32"), b.cast(y, dtype="float32")), b.constant(value=1.5))


def _mod(b, t, m: int):
    t = b.maximum(t, b.constant(value=0, dtype="int64"))
    q = b.cast(b.div(b.cast(t, dtype="float32"), b.constant(value=float(m))), dtype="int64")
    return b.sub(t, b.mul(q, b.constant(value=m, dtype="int64")))


def _f32(b, x):
    return x if x.dtype == "float32" else b.cast(x, dtype="float32")


def _entry_keep(b, positions, entries, dim: int, ratio):
    """bool [B,S,N]: the compact entries (dim `dim` of `entries`) whose group ends at or before each query."""
    bs, s = positions.shape
    one = b.constant(value=1, dtype="int64")
    ends = b.mul(b.add(b.arange_like(entries, dim=dim), one), b.constant(value=ratio, dtype="int64"))
    return b.le(b.reshape(ends, shape=(1, 1, entries.shape[dim])), b.reshape(b.add(positions, one), shape=(bs, s, 1)))


@SLOT_MASK.decomposition
def _(b, logits, positions, ratio):
    keep = _entry_keep(b, positions, logits, 2, ratio)
    return b.where(keep, _f32(b, logits), b.constant(value=float("-inf")))


def _slot_keep(b, positions, comp, ratio, indices):
    bs, s = positions.shape
    slot = b.arange_like(comp, dim=1)
    t = comp.shape[1]
    keep = _entry_keep(b, positions, comp, 1, ratio)
    if indices is None:
        return keep
    k = indices.shape[2]
    slot = b.reshape(b.cast(slot, dtype=indices.dtype), shape=(1, 1, 1, t))
    hit = b.eq(b.reshape(indices, shape=(bs, s, k, 1)), slot)
    chosen = b.gt(b.sum(b.cast(hit, dtype="float32"), dims=(2,)), b.constant(value=0.0))
    return _and(b, keep, chosen)


@SINK.decomposition
def _(b, q, kv, sinks, positions, comp=None, indices=None, *, window, ratio=0, scale):
    bs, s, h, d = q.shape
    n, n_state = kv.shape[1], simplify(kv.shape[1] - q.shape[1])
    expect(isinstance(n_state, int), f"attention.sink: the sliding state length {n_state} must be fixed")
    p0 = b.slice(positions, dim=1, start=0, end=1)
    kpos = b.add(b.sub(p0, b.constant(value=n_state, dtype="int64")), b.reshape(b.arange_like(kv, dim=1),
                                                                               shape=(1, n)))
    diff = b.sub(b.reshape(positions, shape=(bs, s, 1)), b.reshape(kpos, shape=(bs, 1, n)))
    zero = b.constant(value=0, dtype="int64")
    keep = _and(b, _and(b, b.reshape(b.ge(kpos, zero), shape=(bs, 1, n)), b.ge(diff, zero)),
                b.lt(diff, b.constant(value=window, dtype="int64")))
    keys = _f32(b, kv)
    if comp is not None:
        keys = b.concat(keys, _f32(b, comp), dim=1)
        keep = b.concat(keep, _slot_keep(b, positions, comp, ratio, indices), dim=-1)
    n_all = keys.shape[1]
    scores = b.mul(b.einsum(_f32(b, q), keys, equation="bshd,btd->bsht"), b.constant(value=scale))
    scores = b.where(b.reshape(keep, shape=(bs, s, 1, n_all)), scores, b.constant(value=float("-inf")))
    sink = b.reshape(_f32(b, sinks), shape=(1, 1, h, 1))
    m = b.maximum(b.amax(scores, dims=(-1,), keepdim=True), sink)
    e = b.exp(b.sub(scores, m))
    den = b.add(b.sum(e, dims=(-1,), keepdim=True), b.exp(b.sub(sink, m)))
    out = b.einsum(b.div(e, den), keys, equation="bsht,btd->bshd")
    return out if q.dtype == "float32" else b.cast(out, dtype=q.dtype)


def _windows(b, ext, new, rows: int):
    """[B, S, rows, C]: for each new row i (of `new`), ext rows i .. i+rows-1, the window ending at ext row R+i."""
    bs, s, c = new.shape
    idx = b.add(b.reshape(b.arange_like(new, dim=1), shape=(s, 1)),
                b.constant(value=tuple(range(rows)), shape=(1, rows), dtype="int64"))
    flat = b.index_select(ext, b.reshape(idx, shape=(s * rows,)), dim=1)
    return b.reshape(flat, shape=(bs, s, rows, c))


@COMPRESS.decomposition
def _(b, kv, gate, state, bias, positions, past, ratio, overlap=False):
    """Every new token's pooled window, then the rows that end a group: j * ratio + (ratio - 1 - T mod ratio) for
    the N completed groups (T = positions[0, 0]; the arange over N is one of an expanded N-wide constant)."""
    bs, s, c = kv.shape
    r = state.shape[1]
    st_kv, st_gate = b.split(state, sizes=(c, c), dim=-1)
    p0 = b.slice(positions, dim=1, start=0, end=1)
    before = b.add(b.sub(p0, b.constant(value=r, dtype="int64")),
                   b.constant(value=tuple(range(r)), shape=(1, r), dtype="int64"))
    ext_pos = b.concat(before, positions, dim=1)                                     # [B, R+S]
    rows = b.reshape(b.index_select(_f32(b, bias), b.reshape(_mod(b, ext_pos, ratio), shape=(bs * (r + s),)),
                                    dim=0), shape=(bs, r + s, c))
    ext_gate = b.add(b.concat(_f32(b, st_gate), _f32(b, gate), dim=1), rows)
    valid = b.reshape(b.ge(ext_pos, b.constant(value=0, dtype="int64")), shape=(bs, r + s, 1))
    ext_gate = b.where(valid, ext_gate, b.constant(value=float("-inf")))
    wkv = _windows(b, b.concat(_f32(b, st_kv), _f32(b, kv), dim=1), kv, r + 1)
    wg = _windows(b, ext_gate, kv, r + 1)
    if overlap:
        dd = c // 2
        parts = []
        for w in (wkv, wg):
            prev, cur = b.split(w, sizes=(ratio, ratio), dim=2)
            parts.append(b.concat(b.split(prev, sizes=(dd, dd), dim=-1)[0], b.split(cur, sizes=(dd, dd), dim=-1)[1],
                                  dim=2))
        wkv, wg = parts
    pooled = b.sum(b.mul(wkv, b.softmax(wg, dim=2)), dims=(2,))                     # [B, S, D]
    n = completed(past.shape[1], s, ratio)
    j = b.arange_like(b.expand(b.constant(value=0, shape=(1, 1), dtype="int64"), shape=(1, str(n))), dim=1)
    step = b.mul(j, b.constant(value=ratio, dtype="int64"))                           # [N]
    lag = _mod(b, p0, ratio)                                                          # [B, 1]: T mod ratio
    first = b.sub(b.constant(value=ratio - 1, dtype="int64"), b.reshape(b.slice(lag, dim=0, start=0, end=1),
                                                                        shape=(1,)))
    out = b.index_select(pooled, b.add(step, first), dim=1)
    starts = b.add(b.sub(p0, lag), b.reshape(step, shape=(1, str(n))))
    return (out if kv.dtype == "float32" else b.cast(out, dtype=kv.dtype)), starts
