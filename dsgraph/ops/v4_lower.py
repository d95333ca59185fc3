"""Decompositions of V4's position-indexed ops (v4_attn.py) into primitives, for backends without kernels
(TVM lowers them this way; the legalize pass uses them). `v4.compress` has none: the number of entries it makes,
(T+S)//ratio - T//ratio, is no shape a primitive can produce from its inputs' (a backend needs a kernel for it).
"""
from __future__ import annotations

from ..symbolic import simplify
from .registry import expect
from .v4_attn import SINK, SLOT_MASK


def _and(b, x, y):
    """x and y for bool tensors, as a float sum (ONNX Runtime has no bool Where)."""
    return b.gt(b.add(b.cast(x, dtype="float32"), b.cast(y, dtype="float32")), b.constant(value=1.5))


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
