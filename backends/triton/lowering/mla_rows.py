"""Absorbed MLA's row ops (made by the `fuse_mla_rows` pass): the latent cache row, written straight into the KV
cache when `cache.append` is its only reader, and the absorbed query, each one launch at decode."""
from __future__ import annotations

import torch
from dsgraph.backends.lowering import Decline

from dsgraph.ops.rope import rope_frequencies
from dsgraph.pattern import P, Var

from ... import kv_cache
from .. import decode_graphs
from ..codegen import rope as rope_gen
from ..kernels.mla_query import mla_query
from .registry import TABLE, Lowered

_FLOATS = ("float32", "float16", "bfloat16")

# the row and its cache write: cache.append(cache, mla.latent_row(...)), the row read by nothing else
ROW_INTO_CACHE = P("cache.append", Var("cache", kind="cache"),
                   P("mla.latent_row", Var("c_kv"), Var("k_pe"), Var("w"), Var("pos"), name="row"), name="append")


def _inv_freq(ctx, node, dim: int) -> tuple[torch.Tensor, float]:
    inv_freq, mult = rope_frequencies(node.attrs, dim)
    return inv_freq.to(device=ctx.device, dtype=torch.float32).contiguous(), mult


@TABLE.register("mla.latent_row")
def _latent_row(ctx, node):
    """One generated program per token: [RMSNorm(c_kv) | RoPE(k_pe)], written into the cache when the region
    ROW_INTO_CACHE matches (saves the append's copy launch), else into a fresh row tensor."""
    c_kv, k_pe = node.inputs[:2]
    rank, dim, dtype = c_kv.shape[-1], k_pe.shape[-1], c_kv.dtype
    if not all(isinstance(d, int) for d in (rank, dim)) or dtype not in _FLOATS:
        return Decline(f"latent row of {c_kv.type} and {k_pe.type} (static widths, fp32/fp16/bf16) is outside the "
                       "generated kernel")
    inv_freq, mult = _inv_freq(ctx, node, dim)
    gen = rope_gen.mla_cache_row(rank, dim, dtype, node.attrs["eps"], node.attrs["interleaved"], mult)
    m = ctx.region(ROW_INTO_CACHE, node, anchor="row")
    if m is None or m["cache"].dtype != dtype:
        src = ctx.generated(gen, node)
        return Lowered("generated", src.name, fn=lambda a, sym: [src(a[0], a[1], a[2], a[3], inv_freq)])
    src = ctx.generated(gen, *m.nodes)
    append = m.node("append")
    if ctx.paged is not None:  # each token's row at its flat pool slot
        pool = ctx.paged.value(m["cache"])

        def paged(a, sym):
            flat = a[4].view(-1, a[4].shape[-1])
            src(a[0], a[1], a[2], a[3], inv_freq, flat, a[5].reshape(-1), 0, 2)
            return [a[4]]
        return Lowered("generated", f"{src.name} (written at the paged pool's slots)", nodes=tuple(m.nodes),
                       inputs=(*node.inputs, pool, ctx.paged.inputs["cache_slots"]),
                       outputs=(ctx.paged.value(append.outputs[0]),), fn=paged)

    def run(a, sym):  # a[5]: the device-side rows of a static-capacity decode step, else None
        cache, s = a[4], a[0].shape[1]
        if a[5] is None:
            full = kv_cache.extend(cache, s)
            return [src(a[0], a[1], a[2], a[3], inv_freq, full, None, cache.shape[1], 0)]
        return [src(a[0], a[1], a[2], a[3], inv_freq, decode_graphs.extend_static(cache, s), a[5], 0, 1)]
    return Lowered("generated", f"{src.name} (written into the cache: kv_cache.extend's spare rows, or the device-side "
                   "rows of a CUDA-graph decode step)", nodes=tuple(m.nodes),
                   inputs=(*node.inputs, m["cache"], ctx.lengths["cache_rows"]), outputs=append.outputs, fn=run)


@TABLE.register("mla.query_absorbed")
def _query(ctx, node):
    """kernels/mla_query.py: the W_UK absorption and the query's RoPE in one launch."""
    dtype = node.inputs[0].dtype
    if ctx.interpreting and dtype == "bfloat16":
        return Decline("Triton's interpreter computes bf16 tl.dot wrongly; bf16 runs the kernel on CUDA")
    inv_freq, mult = _inv_freq(ctx, node, node.inputs[1].shape[-1])
    interleaved = node.attrs["interleaved"]
    return Lowered("template", "mla_query._mla_query_kernel (W_UK absorb + RoPE, one launch)",
                   fn=lambda a, sym: [mla_query(a[0], a[1], a[2], a[3], inv_freq, mult, interleaved)])
