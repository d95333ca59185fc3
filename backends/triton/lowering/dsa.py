"""DeepSeek Sparse Attention (V3.2): the indexer's LayerNorm (generated), its scores (bf16/fp32 or, for
fp8=True, the FP8 path) and the sparse absorbed MLA (templates in kernels/dsa.py), and its top-k (kernels/topk.py:
on the device, no host sync, the reference's selection and order exactly, ties to the lower position). Naive
`attention.mla_sparse` has no kernel: the triton pipeline absorbs it first, and without absorb_mla it runs its
torch reference, listed as a fallback in the report. The FP8 latent cache's reads are part of the sparse MLA
kernel, which dequantises the rows it gathers (FP8_SPARSE), or else (kv.dequant_fp8) a generated row kernel; its
writes (kv.quant_fp8) a generated row kernel on CUDA, the torch reference (reported) on the interpreter, which
rounds fp32 -> e4m3 wrongly. indexer.quant_fp8 (fp8_index_cache's key writes) runs its torch reference.
In the serve engine's paged decode program the indexer scores, top-k and sparse MLA read the pools through the
block table (bf16/fp32 caches; the FP8 paths there raise, and the engine gathers contiguous caches instead)."""
from __future__ import annotations

from dsgraph.backends.lowering import Decline

from dsgraph.ops.dsa_fp8 import GROUP, rotate_quant_rows
from dsgraph.pattern import ANY, P, Var

from ..codegen import rowwise
from ..kernels.dsa import indexer_logits, sparse_mla
from ..kernels.topk import topk
from .attention import cached_lengths, paged_needs
from .registry import TABLE, Lowered

_FLOATS = ("float32", "float16", "bfloat16")
NO_ROTATION = ("scores in the activation dtype, without the reference's Hadamard rotation and FP8 quantisation "
               "(transformers' path; the rotation is orthogonal)")
FP8_PROLOGUE = ("q and k Hadamard-rotated and rounded to e4m3 by torch ops on the device before the kernel (the "
                "interpreter rounds to e4m3 wrongly, so an in-kernel quantisation could not be checked on the CPU); "
                "the key cache is requantised every step (pass fp8_index_cache stores it quantised)")


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
    if node.attrs["fp8"] and ctx.paged is not None:
        return paged_needs(ctx, Decline("the FP8 indexer reads a contiguous key cache, not a block table"))
    scale, causal = node.attrs["scale"], node.attrs["causal"]
    lens = cached_lengths(ctx, node)   # a static-capacity decode step's lengths, when k is an appended cache
    if node.attrs["fp8"]:
        return _fp8_indexer(node, scale, causal, lens)
    if ctx.paged is not None:         # the paged program: k is the key pool, read through the block table
        return Lowered("template", "dsa._indexer_logits_kernel (block table)", note=NO_ROTATION,
                       inputs=(*map(ctx.paged.value, node.inputs), *lens), outputs=(ctx.paged.keyed(node.outputs[0]),),
                       fn=lambda a, sym: [indexer_logits(a[0], a[1], a[2], scale, causal, a[3], block_table=a[4],
                                                                 check_table=False)])
    return Lowered("template", "dsa._indexer_logits_kernel", note=NO_ROTATION, inputs=(*node.inputs, *lens),
                   fn=lambda a, sym: [indexer_logits(a[0], a[1], a[2], scale, causal, a[3] if lens else None)])


def _fp8_indexer(node, scale, causal, lens):
    """fp8=True: the kernel's FP8 path over the reference's rotated e4m3 q and k (one scale per row of D <= 128)."""
    d = node.inputs[0].shape[-1]
    if d > GROUP:
        return Decline(f"fp8 head dim {d} has {d // GROUP} scales per row; the FP8 kernel takes one per token")

    def run(a, sym):
        (q8, qs), (k8, ks) = rotate_quant_rows(a[0]), rotate_quant_rows(a[1])
        return [indexer_logits(q8, k8, a[2], scale, causal, a[3] if lens else None, q_scale=qs[..., 0],
                               k_scale=ks[..., 0])]
    return Lowered("template", "dsa._indexer_logits_kernel (FP8: e4m3 dot, per-token scales)", note=FP8_PROLOGUE,
                   inputs=(*node.inputs, *lens), fn=run)


@TABLE.register("indexer.logits_fp8")
def _indexer_logits_fp8(ctx, node):
    """The FP8 key cache of fp8_index_cache read as it lies; only q is rotated and quantised per step."""
    groups = node.inputs[2].shape[-1]
    if groups != 1:
        return Decline(f"{groups} scales per key row; the FP8 kernel takes one per token")
    scale, causal = node.attrs["scale"], node.attrs["causal"]
    lens = cached_lengths(ctx, node)

    def run(a, sym):
        q8, qs = rotate_quant_rows(a[0])
        return [indexer_logits(q8, a[1], a[3], scale, causal, a[4] if lens else None, q_scale=qs[..., 0],
                               k_scale=a[2][..., 0])]
    return Lowered("template", "dsa._indexer_logits_kernel (FP8: e4m3 dot, per-token scales, FP8 key cache)",
                   note="q Hadamard-rotated and rounded to e4m3 by torch ops on the device before the kernel",
                   inputs=(*node.inputs, *lens), fn=run)


@TABLE.register("indexer.topk")
def _topk(ctx, node):
    k = node.attrs["k"]
    inputs = node.inputs if ctx.paged is None else tuple(map(ctx.paged.value, node.inputs))
    return Lowered("template", "topk._topk_kernel (radix select, then a sort of the k picks)", inputs=inputs,
                   fn=lambda a, sym: [topk(a[0], k)])


def _sparse_step(ctx, attn, split_q: bool, fp8: tuple = ()):
    """The sparse-MLA template for `attn`; its step takes (q, cache, indices[, cache_lens]), with split_q (q latent,
    q rope, ...): the two inputs of the concat that makes q; with fp8 (the FP8 latent cache's rows, scales, rope
    values) those three in the cache's place."""
    refused = _interpreter_bf16(ctx, *attn.inputs[:2])
    if refused:
        return paged_needs(ctx, refused)
    paged = ctx.paged is not None
    if paged and fp8:
        return paged_needs(ctx, Decline("the FP8 latent cache is read contiguous, not through a block table"))
    scale, causal, rank = attn.attrs["scale"], attn.attrs["causal"], attn.attrs["kv_lora_rank"]
    q = tuple(attn.inputs[0].node.inputs) if split_q else (attn.inputs[0],)
    cache = fp8 or (attn.inputs[1],)
    lens = cached_lengths(ctx, attn)   # [cache_lens[, the paged program's block table]]

    def run(a, sym):
        qs, cs, rest = a[:len(q)], a[len(q):len(q) + len(cache)], a[len(q) + len(cache):]
        parts = {"cache_scale": cs[1], "cache_rope": cs[2]} if fp8 else {}
        return [sparse_mla(qs[0], cs[0], rest[0], scale, rank, causal, kv_lens=rest[1] if lens else None,
                           q_rope=qs[1] if split_q else None, block_table=rest[2] if paged else None,
                           check_table=not paged, **parts)]
    what = "FP8 latent rows dequantised in registers" if fp8 else "gathers the selected latent rows"
    rest = tuple(map(ctx.paged.value, (*cache, attn.inputs[2]))) if paged else (*cache, attn.inputs[2])
    return Lowered("template", f"dsa._sparse_mla_kernel ({what}" + (" through the block table)" if paged else ")"),
                   inputs=(*q, *rest, *lens), fn=run)


@TABLE.register("attention.mla_sparse_absorbed")
def _sparse_mla(ctx, node):
    return _sparse_step(ctx, node, split_q=False)


# the query as absorb_mla emits it: concat(q_latent, q_rope), read by nothing but the sparse attention
Q_CONCAT = P("concat", Var("q_lat"), Var("q_rope"), dim=lambda d: d in (-1, 3), name="q")
Q_INTO_SPARSE = P("attention.mla_sparse_absorbed", Q_CONCAT, Var("cache"), Var("idx"), kv_lora_rank=ANY)
# the FP8 latent cache as fp8_latent_cache emits it (passes/kvcache.py), read by nothing but the sparse attention
FP8_LATENT = P("concat", P("kv.dequant_fp8", Var("rows"), Var("scales"), name="dq"), Var("rope"),
               dim=lambda d: d in (-1, 2), name="latent")
FP8_SPARSE = {True: P("attention.mla_sparse_absorbed", Q_CONCAT, FP8_LATENT, Var("idx"), kv_lora_rank=ANY),
              False: P("attention.mla_sparse_absorbed", Var("q"), FP8_LATENT, Var("idx"), kv_lora_rank=ANY)}


def _split_q_ok(m) -> bool:
    return m["q_lat"].type.shape[-1] == m.attr("kv_lora_rank")


@TABLE.register("concat", "kv.dequant_fp8")
def _fp8_into_sparse(ctx, node):
    """The region FP8_SPARSE, claimed from whichever of its nodes comes first: the kernel reads the FP8 cache's
    parts (and the query's, when absorb_mla's concat makes it) where they lie."""
    anchors = ("q", "latent") if node.op == "concat" else ("dq",)
    for split_q, pattern in FP8_SPARSE.items():
        for anchor in anchors if split_q else [a for a in anchors if a != "q"]:
            m = ctx.region(pattern, node, anchor=anchor)
            if m is None or split_q and not _split_q_ok(m):
                continue
            step = _sparse_step(ctx, m.root, split_q, fp8=(m["rows"], m["scales"], m["rope"]))
            if isinstance(step, Decline):
                return step
            kernel = f"{step.kernel}, q read in two parts (no concat)" if split_q else step.kernel
            return Lowered(step.kind, kernel, nodes=tuple(m.nodes), inputs=step.inputs, outputs=m.root.outputs,
                           fn=step.fn)
    return Decline("not the FP8 latent cache concat(kv.dequant_fp8(rows, scales), rope) read only by "
                   "attention.mla_sparse_absorbed")


@TABLE.register("concat")
def _q_into_sparse(ctx, node):
    """The region Q_INTO_SPARSE: the kernel reads the two query parts where they lie (no concat launch)."""
    m = ctx.region(Q_INTO_SPARSE, node, anchor="q")
    if m is None or not _split_q_ok(m):
        return Decline("not the query concat(q_latent, q_rope) read only by attention.mla_sparse_absorbed")
    step = _sparse_step(ctx, m.root, split_q=True)
    if isinstance(step, Decline):
        return step
    return Lowered(step.kind, f"{step.kernel}, q read in two parts (no concat)", nodes=tuple(m.nodes),
                   inputs=step.inputs, outputs=m.root.outputs, fn=step.fn)


@TABLE.register("kv.quant_fp8")
def _fp8_quant_rows(ctx, node):
    n, group = node.inputs[0].shape[-1], node.attrs["group"]
    if ctx.interpreting:
        return Decline("Triton's interpreter rounds fp32 -> e4m3 wrongly; the generated kernel runs on CUDA")
    if not isinstance(n, int) or group & (group - 1) or (n // group) & (n // group - 1):
        return Decline(f"row width {n} / group {group}: the generated kernel needs powers of two")
    src = ctx.generated(rowwise.fp8_quant_rows(n, group), node)
    return Lowered("generated", src.name, fn=lambda a, sym: list(src(*a)))


@TABLE.register("kv.dequant_fp8")
def _fp8_rows(ctx, node):
    n, dtype = node.inputs[0].shape[-1], node.attrs["dtype"]
    if not isinstance(n, int) or dtype not in _FLOATS:
        return Decline(f"row width {n} / dtype {dtype} not supported by the generated kernel")
    src = ctx.generated(rowwise.fp8_dequant_rows(n, node.attrs["group"], dtype), node)
    return Lowered("generated", src.name, fn=lambda a, sym: [src(*a)])
