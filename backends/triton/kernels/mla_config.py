"""The launch choices of absorbed-MLA decode, shared by the split-KV template (mla_decode.py) and the Gluon
kernel (mla_decode_gluon.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MLAConfig:
    """One launch choice; `mla_absorbed(..., config=...)` runs exactly it (benchmarks sweep these)."""
    block_h: int
    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int
    kernel: str = "triton"  # or "gluon": mla_decode_gluon, which has fixed tiles and one split
