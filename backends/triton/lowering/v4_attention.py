"""DeepSeek-V4's attention path as templates (kernels/v4_attention.py, kernels/topk.py): the window + compressed +
sink attention in one split-KV kernel, the compressor's pooling, and the CSA indexer's slot mask applied inside
the top-k that reads it (no pass of its own). The positions bound every read, so a static-capacity decode step's
compressed cache needs no length input: entries past a query's position are never read. The serve engine's paged
program declines V4 (its compact [B, T//m, D] entries are not paged: backends/triton/paged_decode.py), so these
kernels read contiguous caches only. In a static-capacity step the compressor writes one candidate entry per step
(decode_graphs.LENGTH_READERS), read once its group is complete."""
from __future__ import annotations

from dsgraph.backends.lowering import Decline

from dsgraph.pattern import ANY, P, Var

from ..kernels.topk import topk
from ..kernels.v4_attention import compress, sink_attention
from .attention import paged_needs
from .registry import TABLE, Lowered

_FLOATS = ("float32", "float16", "bfloat16")
# the CSA indexer's masked scores, read by nothing but its top-k
MASKED_TOPK = P("indexer.topk", P("indexer.slot_mask", Var("logits"), Var("positions"), ratio=ANY, name="mask"),
                k=ANY)


@TABLE.register("attention.sink")
def _sink(ctx, node):
    if ctx.interpreting and node.inputs[0].dtype == "bfloat16":
        return paged_needs(ctx, Decline("Triton's interpreter computes bf16 tl.dot wrongly; bf16 runs on CUDA"))
    window, ratio, scale = node.attrs["window"], node.attrs["ratio"], node.attrs["scale"]
    comp = len(node.inputs) - 4     # 0: sliding only, 1: + dense compressed entries (HCA), 2: + indices (CSA)

    def run(a, sym):
        return [sink_attention(a[0], a[1], a[2], a[3], window, scale, comp=a[4] if comp else None,
                               indices=a[5] if comp == 2 else None, ratio=ratio)]
    what = ("window rows", "window rows + every visible compressed slot", "window rows + the top-k compressed slots")
    return Lowered("template", f"v4_attention._sink_attention_kernel ({what[comp]}, per-head sink; split-KV with "
                   "mla_decode._mla_reduce_kernel)", fn=run)


@TABLE.register("v4.compress")
def _compress(ctx, node):
    if any(v.dtype not in _FLOATS for v in node.inputs[:4]):
        return Decline(f"dtypes {[v.dtype for v in node.inputs[:4]]}: the kernel takes float16/bfloat16/float32")
    ratio, overlap = node.attrs["ratio"], node.attrs["overlap"]

    def run(a, sym):   # a[6]: a static-capacity step's device-side token count: one candidate entry, else None
        return list(compress(*a[:5], past=a[5].shape[1], ratio=ratio, overlap=overlap, candidate=a[6] is not None))
    return Lowered("template", "v4_attention._compress_kernel (softmax-gated pooling over the window of each "
                   "completed group, state read in place" + ("; CSA overlap)" if overlap else ")"),
                   inputs=(*node.inputs, ctx.lengths["cache_rows"]), fn=run)


@TABLE.register("indexer.slot_mask")
def _masked_topk(ctx, node):
    """The region MASKED_TOPK: the top-k kernel reads the unmasked scores of the entries each query sees."""
    m = ctx.region(MASKED_TOPK, node, anchor="mask")
    if m is None:
        return Decline("not indexer.slot_mask read only by indexer.topk (the kernel applies it inside the top-k)")
    ratio, k = m.attr("ratio", "mask"), m.attr("k")
    inputs = (m["logits"], m["positions"])
    inputs = inputs if ctx.paged is None else tuple(map(ctx.paged.value, inputs))
    return Lowered("template", "topk._topk_kernel (radix select, then a sort of the k picks; indexer.slot_mask "
                   "applied as it reads)", nodes=tuple(m.nodes), inputs=inputs, outputs=m.root.outputs,
                   fn=lambda a, sym: [topk(a[0], k, slot_ratio=ratio, positions=a[1])])
