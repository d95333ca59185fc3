"""DeepSeek-V4's data-movement and GEMM-shaped ops as named library calls: the grouped output projection is one
batched GEMM over the groups (cuBLAS on CUDA), the sliding state one concat and slice. The attention path
(compressor, windowed sink attention, the indexer's slot mask) is in v4_attention.py; mHC, routing and the
clamped FFN pieces are in v4_mix.py."""
from __future__ import annotations

import torch

from .registry import TABLE, Lowered


@TABLE.register("linear.grouped")
def _(ctx, node):
    def run(a, sym):
        x, w = a
        g = x.shape[-2]
        return [torch.einsum("bsgi,goi->bsgo", x, w.reshape(g, -1, x.shape[-1]))]
    return Lowered("library", "torch.einsum bsgi,goi->bsgo (one batched GEMM over the groups; cuBLAS on CUDA)", fn=run)


@TABLE.register("cache.slide")
def _(ctx, node):
    def run(a, sym):
        state, new = a
        r = state.shape[1]
        return [torch.cat((state, new.to(state.dtype)), 1)[:, -r:].contiguous() if r else state]
    return Lowered("library", "torch.cat + slice (the last R rows of state and new)", fn=run)
