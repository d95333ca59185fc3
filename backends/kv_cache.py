"""KV caches that grow in place behind `cache.append`'s functional contract.

`cache.append(cache [B,T,...], new [B,S,...])` is defined as a concatenation. Done literally, every decode step
copies every layer's whole cache (at B=64, T=4096 DeepSeek-V2-Lite's latent caches are 8 GB). A backend that
lowers the op with `append` instead keeps each cache in a buffer with spare capacity along the length dim and
returns views of it: appending to the newest view writes only the S new rows; a full buffer is reallocated with
headroom (amortised O(S) per step).

The contract stays functional: a view once handed out never changes. The buffer records its frontier (the longest
length any view of it was given); only a view that ends at the frontier may write past it. Appending to an older
view (a state someone branched from) copies into a new buffer instead of overwriting the newer state's rows.
`rewind` releases the rows past a view, for callers that own the longer states and drop them. Each buffer also
keeps weak references to the views it handed out, so an owner that must overwrite rows below the frontier (the
CUDA-graph decode buffers, backends/triton/decode_graphs.py) can tell whether anyone still sees them (`in_use`).
"""
from __future__ import annotations

import weakref

import torch

GROWTH = 1.25     # new capacity = 1.25 x the needed length, plus ...
HEADROOM = 256    # ... at least this many spare rows, rounded up to a multiple of it
_FRONTIER = "_dsgraph_kv_frontier"
_VIEWS = "_dsgraph_kv_views"


def frontier(buf: torch.Tensor) -> int | None:
    """The longest length any view of the buffer `buf` was given (None for a tensor that is no such buffer)."""
    return getattr(buf, _FRONTIER, None)


def buffer_of(cache: torch.Tensor) -> torch.Tensor | None:
    """The capacity buffer `cache` is a prefix view of (same start, same strides), else None."""
    base = cache._base
    if base is None or frontier(base) is None:
        return None
    # the storage offset, not data_ptr: an empty view (a compact cache of no entries yet) has data_ptr 0
    if cache.storage_offset() != base.storage_offset() or cache.stride() != base.stride():
        return None
    if cache.shape[0] != base.shape[0] or cache.shape[2:] != base.shape[2:]:
        return None
    return base


def _remember(buf: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """Record (weakly) that `view` of `buf` was handed out."""
    refs = [r for r in getattr(buf, _VIEWS, ()) if r() is not None]
    setattr(buf, _VIEWS, refs + [weakref.ref(view)])
    return view


def in_use(buf: torch.Tensor) -> bool:
    """Whether a view this buffer handed out (append, reserve, rewind, `view`) is still alive."""
    return any(r() is not None for r in getattr(buf, _VIEWS, ()))


def view(buf: torch.Tensor, length: int) -> torch.Tensor:
    """The newest view of `buf`: its first `length` rows, with the frontier there."""
    setattr(buf, _FRONTIER, length)
    return _remember(buf, buf[:, :length])


def capacity(cache: torch.Tensor) -> int:
    """Rows the cache's buffer holds along the length dim (its own length for a plain tensor)."""
    buf = buffer_of(cache)
    return cache.shape[1] if buf is None else buf.shape[1]


def extend(cache: torch.Tensor, s: int) -> torch.Tensor:
    """The view `append(cache, new)` returns for S = `s` new rows, those rows not yet written: the caller writes
    rows T..T+S-1 of it before anyone reads them (a kernel that computes the new rows in place)."""
    t = cache.shape[1]
    buf = buffer_of(cache)
    if buf is None or frontier(buf) != t or buf.shape[1] < t + s:
        need = t + s
        cap = -(-int(need * GROWTH + HEADROOM) // HEADROOM) * HEADROOM
        buf = torch.empty((cache.shape[0], cap, *cache.shape[2:]), dtype=cache.dtype, device=cache.device)
        buf[:, :t].copy_(cache)
    return view(buf, t + s)


def append(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """torch.cat((cache, new), dim=1), written in place when `cache` is the newest view of a buffer with room."""
    out = extend(cache, new.shape[1])
    out[:, cache.shape[1]:].copy_(new)
    return out


def reserve(cache: torch.Tensor, extra: int) -> torch.Tensor:
    """`cache` moved into a buffer with room for `extra` more rows (a view of it, the newest)."""
    t = cache.shape[1]
    buf = torch.empty((cache.shape[0], t + extra, *cache.shape[2:]), dtype=cache.dtype, device=cache.device)
    buf[:, :t].copy_(cache)
    return view(buf, t)


def rewind(cache: torch.Tensor) -> torch.Tensor:
    """Make `cache` the newest view of its buffer, releasing the rows past it, so the next append from it writes
    in place. Only for a caller that owns the longer states and drops them (speculative decoding cutting back
    rejected drafts, a benchmark re-running one step): their views would see the rows overwritten."""
    buf = buffer_of(cache)
    if buf is not None:
        setattr(buf, _FRONTIER, cache.shape[1])
        _remember(buf, cache)
    return cache
