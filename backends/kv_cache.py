"""KV caches that grow in place behind `cache.append`'s functional contract.

`cache.append(cache [B,T,...], new [B,S,...])` is defined as a concatenation. Done literally, every decode step
copies every layer's whole cache (at B=64, T=4096 DeepSeek-V2-Lite's latent caches are 8 GB). A backend that
lowers the op with `append` instead keeps each cache in a buffer with spare capacity along the length dim and
returns views of it: appending to the newest view writes only the S new rows; a full buffer is reallocated with
headroom (amortised O(S) per step).

The contract stays functional: a view once handed out never changes. The buffer records its frontier (the longest
length any view of it was given); only a view that ends at the frontier may write past it. Appending to an older
view (a state someone branched from) copies into a new buffer instead of overwriting the newer state's rows.
`rewind` releases the rows past a view, for callers that own the longer states and drop them.
"""
from __future__ import annotations

import torch

GROWTH = 1.25     # new capacity = 1.25 x the needed length, plus ...
HEADROOM = 256    # ... at least this many spare rows, rounded up to a multiple of it
_FRONTIER = "_dsgraph_kv_frontier"


def _buffer_of(cache: torch.Tensor) -> torch.Tensor | None:
    """The capacity buffer `cache` is a prefix view of (same start, same strides), else None."""
    base = cache._base
    if base is None or getattr(base, _FRONTIER, None) is None:
        return None
    if cache.data_ptr() != base.data_ptr() or cache.stride() != base.stride():
        return None
    if cache.shape[0] != base.shape[0] or cache.shape[2:] != base.shape[2:]:
        return None
    return base


def capacity(cache: torch.Tensor) -> int:
    """Rows the cache's buffer holds along the length dim (its own length for a plain tensor)."""
    buf = _buffer_of(cache)
    return cache.shape[1] if buf is None else buf.shape[1]


def append(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """torch.cat((cache, new), dim=1), written in place when `cache` is the newest view of a buffer with room."""
    t, s = cache.shape[1], new.shape[1]
    buf = _buffer_of(cache)
    if buf is None or getattr(buf, _FRONTIER) != t or buf.shape[1] < t + s:
        need = t + s
        cap = -(-int(need * GROWTH + HEADROOM) // HEADROOM) * HEADROOM
        buf = torch.empty((cache.shape[0], cap, *cache.shape[2:]), dtype=cache.dtype, device=cache.device)
        buf[:, :t].copy_(cache)
    buf[:, t:t + s].copy_(new)
    setattr(buf, _FRONTIER, t + s)
    return buf[:, :t + s]


def reserve(cache: torch.Tensor, extra: int) -> torch.Tensor:
    """`cache` moved into a buffer with room for `extra` more rows (a view of it, the newest)."""
    t = cache.shape[1]
    buf = torch.empty((cache.shape[0], t + extra, *cache.shape[2:]), dtype=cache.dtype, device=cache.device)
    buf[:, :t].copy_(cache)
    setattr(buf, _FRONTIER, t)
    return buf[:, :t]


def rewind(cache: torch.Tensor) -> torch.Tensor:
    """Make `cache` the newest view of its buffer, releasing the rows past it, so the next append from it writes
    in place. Only for a caller that owns the longer states and drops them (speculative decoding cutting back
    rejected drafts, a benchmark re-running one step): their views would see the rows overwritten."""
    buf = _buffer_of(cache)
    if buf is not None:
        setattr(buf, _FRONTIER, cache.shape[1])
    return cache
