"""DeepSeek Sparse Attention (V3.2): the indexer's LayerNorm (generated), its scores and the sparse absorbed MLA
(templates in kernels/dsa.py), and its top-k (torch's stable sort on the device: no host sync, ties to the lower
position as the op defines). Naive `attention.mla_sparse` has no kernel: the triton pipeline absorbs it first,
and without absorb_mla it runs its torch reference, listed as a fallback in the report. The FP8 latent cache's
reads (kv.dequant_fp8) are a generated row kernel; its writes (kv.quant_fp8) run the torch reference, reported:
Triton's interpreter rounds fp32 -> e4m3 wrongly, so a kernel could not be checked on the CPU."""
from __future__ import annotations

from dsgraph.backends.lowering import Decline

from dsgraph.ops.dsa import topk_ref
from dsgraph.pattern import ANY, P, Var

from ..codegen import rowwise
from ..kernels.dsa import indexer_logits, sparse_mla
from .attention import cached_lengths, paged_needs
from .registry import TABLE, Lowered

_FLOATS = ("float32", "float16", "bfloat16")
NO_ROTATION = ("scores in the activation dtype, without the reference's Hadamard rotation and FP8 quantisation "
               "(transformers' path; the rotation is orthogonal)")


def _interpreter_bf16(ctx, *values) -> Decline | None:
    if ctx.interpreting and any(v.dtype == "bfloat16" for v in values):
        return Decline("Triton's interpreter computes bf16 tl.dot wrongly; bf16 runs on CUDA")
    return None


@TABLE.register("norm.layer")
def _layer_norm(ctx, node):
    n, dtype = node.inputs[0].shape[-1], node.inputs[0].dtype
    if not isinstance(n, int) or dtype not in _FLOATS:
        return Decline(f"row width {n} / dtype {dtype} not supported by the generated kernel")
    src = ctx.generated(rowwise.layer_norm(n, dtype, node.attrs["eps"]), node)
    return Lowered("generated", src.name, fn=lambda a, sym: [src(*a)])


@TABLE.register("indexer.logits")
def _indexer_logits(ctx, node):
    refused = _interpreter_bf16(ctx, *node.inputs[:2])
    if refused:
        return paged_needs(ctx, refused)
    if node.attrs["fp8"]:
        return paged_needs(ctx, Decline("fp8=True (DeepSeek's Hadamard + e4m3 indexer numerics) has no kernel yet; "
                                         "its reference runs"))
    scale, causal = node.attrs["scale"], node.attrs["causal"]
    lens = cached_lengths(ctx, node)   # a static-capacity decode step's lengths, when k is an appended cache
    if ctx.paged is not None:         # the paged program: k is the key pool, read through the block table
        return Lowered("template", "dsa._indexer_logits_kernel (block table)", note=NO_ROTATION,
                       inputs=(*map(ctx.paged.value, node.inputs), *lens), outputs=(ctx.paged.keyed(node.outputs[0]),),
                       fn=lambda a, sym: [indexer_logits(a[0], a[1], a[2], scale, causal, a[3], block_table=a[4])])
    return Lowered("template", "dsa._indexer_logits_kernel", note=NO_ROTATION, inputs=(*node.inputs, *lens),
                   fn=lambda a, sym: [indexer_logits(a[0], a[1], a[2], scale, causal, a[3] if lens else None)])


@TABLE.register("indexer.topk")
def _topk(ctx, node):
    k = node.attrs["k"]
    inputs = node.inputs if ctx.paged is None else tuple(map(ctx.paged.value, node.inputs))
    return Lowered("library", "torch.sort (stable, on the device; the op's reference code)", inputs=inputs,
                   fn=lambda a, sym: [topk_ref(a[0], k)])


def _sparse_step(ctx, attn, split_q: bool):
    """The sparse-MLA template for `attn`; its step takes (q, cache, indices[, cache_lens]), with split_q (q latent,
    q rope, cache, indices[, cache_lens]): the two inputs of the concat that makes q."""
    refused = _interpreter_bf16(ctx, *attn.inputs[:2])
    if refused:
        return paged_needs(ctx, refused)
    scale, causal, rank = attn.attrs["scale"], attn.attrs["causal"], attn.attrs["kv_lora_rank"]
    q = tuple(attn.inputs[0].node.inputs) if split_q else (attn.inputs[0],)
    lens = cached_lengths(ctx, attn)
    paged = ctx.paged is not None

    def run(a, sym):  # rest: cache, indices[, lengths[, the paged program's block table]]
        q_rope, rest = (a[1], a[2:]) if split_q else (None, a[1:])
        return [sparse_mla(a[0], rest[0], rest[1], scale, rank, causal, kv_lens=rest[2] if lens else None,
                           q_rope=q_rope, block_table=rest[3] if paged else None)]
    rest = tuple(map(ctx.paged.value, attn.inputs[1:])) if paged else attn.inputs[1:]
    return Lowered("template", "dsa._sparse_mla_kernel (gathers the selected latent rows"
                   + (" through the block table)" if paged else ")"), inputs=(*q, *rest, *lens), fn=run)


@TABLE.register("attention.mla_sparse_absorbed")
def _sparse_mla(ctx, node):
    return _sparse_step(ctx, node, split_q=False)


# the query as absorb_mla emits it: concat(q_latent, q_rope), read by nothing but the sparse attention
Q_INTO_SPARSE = P("attention.mla_sparse_absorbed", P("concat", Var("q_lat"), Var("q_rope"), dim=lambda d: d in (-1, 3),
                                                     name="q"), Var("cache"), Var("idx"), kv_lora_rank=ANY)


@TABLE.register("concat")
def _q_into_sparse(ctx, node):
    """The region Q_INTO_SPARSE: the kernel reads the two query parts where they lie (no concat launch)."""
    m = ctx.region(Q_INTO_SPARSE, node, anchor="q")
    if m is None or m["q_lat"].type.shape[-1] != m.attr("kv_lora_rank"):
        return Decline("not the query concat(q_latent, q_rope) read only by attention.mla_sparse_absorbed")
    step = _sparse_step(ctx, m.root, split_q=True)
    if isinstance(step, Decline):
        return step
    return Lowered(step.kind, f"{step.kernel}, q read in two parts (no concat)", nodes=tuple(m.nodes),
                   inputs=step.inputs, outputs=m.root.outputs, fn=step.fn)


@TABLE.register("kv.dequant_fp8")
def _fp8_rows(ctx, node):
    n, dtype = node.inputs[0].shape[-1], node.attrs["dtype"]
    if not isinstance(n, int) or dtype not in _FLOATS:
        return Decline(f"row width {n} / dtype {dtype} not supported by the generated kernel")
    src = ctx.generated(rowwise.fp8_dequant_rows(n, node.attrs["group"], dtype), node)
    return Lowered("generated", src.name, fn=lambda a, sym: [src(*a)])
