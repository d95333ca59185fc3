"""Attention: the flash prefill template (attention.gqa / attention.mla) and the absorbed-MLA split-KV decode
template (attention.mla_absorbed). Both kernels live in kernels/flash_attention.py and kernels/mla_decode.py."""
from __future__ import annotations

from dsgraph.backends.lowering import Decline

from dsgraph.errors import BackendUnavailable
from dsgraph.pattern import ANY, P, Var

from ..decode_graphs import from_appended_cache
from ..kernels import mla_decode
from ..kernels.flash_attention import flash_attention
from ..kernels.mla_decode import mla_absorbed
from .registry import TABLE, Lowered


def _kernel(ctx, fn, dtype: str):
    if ctx.interpreting and dtype == "bfloat16":
        return Decline("Triton's interpreter computes bf16 tl.dot wrongly; bf16 attention runs on CUDA")
    return fn


@TABLE.register("attention.gqa", "attention.mla")
def _flash(ctx, node):
    fn = _kernel(ctx, flash_attention, node.inputs[0].dtype)
    if isinstance(fn, Decline):
        return paged_needs(ctx, fn)
    scale, causal = node.attrs["scale"], node.attrs["causal"]
    lens = cached_lengths(ctx, node)
    paged = ctx.paged is not None

    def run(a, sym):  # a[3:] with `lens`: the device-side lengths (and the paged program's block table)
        return [fn(a[0], a[1], a[2], scale, causal, kv_lens=a[3] if lens else None,
                   block_table=a[4] if paged else None, check_table=not paged)]
    inputs = tuple(ctx.paged.value(v) for v in node.inputs) if paged else node.inputs
    kernel = "flash_attention._flash_attention_kernel" + (" (block table)" if paged else "")
    return Lowered("template", kernel, inputs=(*inputs, *lens), fn=run)


def cached_lengths(ctx, node) -> tuple:
    """The step input `cache_lens` where the node's keys come from `cache.append`, directly or through row-wise
    ops (a static-capacity decode step must then mask by that length; the paged program also reads the block
    table, whose ids its caller checks on the host: its kernels take check_table=False), else nothing."""
    if not any(from_appended_cache(v) for v in node.inputs[1:]):
        return ()
    if ctx.paged is None and any("//" in str(v.shape[1]) for v in node.inputs[1:2]):
        return ()   # compact keys (V4's indexer): its top-k masks them by the query positions, not by a length
    if ctx.paged is not None:
        return ctx.paged.inputs["cache_lens"], ctx.paged.inputs["block_table"]
    return (ctx.lengths["cache_lens"],)


def paged_needs(ctx, decline: Decline) -> Decline:
    """A decline, except in the paged program, where the torch reference cannot read a pool: say why it fails."""
    if ctx.paged is not None:
        raise BackendUnavailable(f"the paged decode program needs the triton attention kernels: {decline.reason}")
    return decline


def _mla_step(attn, ctx, split_q: bool):
    """The absorbed-MLA decode template for `attn`; its step takes (q, cache[, cache_lens]), with split_q
    (q latent, q rope, cache[, cache_lens]): the two inputs of the concat that makes q."""
    fn = _kernel(ctx, mla_absorbed, attn.inputs[0].dtype)
    if isinstance(fn, Decline):
        return paged_needs(ctx, fn)
    scale, causal, rank = attn.attrs["scale"], attn.attrs["causal"], attn.attrs["kv_lora_rank"]
    q = tuple(attn.inputs[0].node.inputs) if split_q else (attn.inputs[0],)
    lens = cached_lengths(ctx, attn)
    paged = ctx.paged is not None
    n_q = len(q)

    def run(a, sym):
        q, q_rope, cache = (a[0], a[1], a[2]) if split_q else (a[0], None, a[1])
        static = a[n_q + 1] if lens else None  # the device-side lengths of a static or paged step, else None
        if static is None:
            return [fn(q, cache, scale, rank, causal=causal, q_rope=q_rope)]
        # the static buffers start zeroed and only ever receive computed rows, so rows past a length are finite.
        # Tuned per shape for one-token queries only: prefill rows (a serving step's packed chunks) change shape
        # every step, and timing each new one costs more than it saves; they take the default tiles
        return [fn(q, cache, scale, rank, cache_lens=static, causal=causal, q_rope=q_rope, finite_tail=True,
                   tune=not ctx.interpreting and q.shape[1] == 1, block_table=a[n_q + 2] if paged else None,
                   check_table=not paged)]
    cache = ctx.paged.value(attn.inputs[1]) if paged else attn.inputs[1]
    note = " through the block table" if paged else _gluon_note(attn, ctx)
    return Lowered("template", f"mla_decode._mla_decode_kernel (split-KV){note}",
                   inputs=(*q, cache, *lens), fn=run)


def _gluon_note(attn, ctx) -> str:
    """What the report says of the Hopper Gluon kernel, which `mla_absorbed` picks per call where it fits."""
    gluon = mla_decode.gluon_kernel
    if gluon is None:
        return f"; Gluon kernel off ({mla_decode.NO_GLUON})" if mla_decode.hopper(ctx.device) else ""
    q_shape, rank = attn.inputs[0].type.shape, attn.attrs["kv_lora_rank"]
    if not isinstance(q_shape[2], int) or gluon.shape_unfit(1, q_shape[2], rank, q_shape[3] - rank):
        return ""  # outside the kernel's shapes: no note
    if not mla_decode.hopper(ctx.device):
        return "; Gluon kernel off (needs an sm_90 GPU)"
    return ("; CUDA-graph decode steps whose batch fills the GPU: mla_decode_gluon._mla_decode_gluon (Hopper, "
            "warp-specialised), where the tuner confirms it")


@TABLE.register("attention.mla_absorbed")
def _mla(ctx, node):
    return _mla_step(node, ctx, split_q=False)


# the query absorbed MLA reads as `absorb_mla` emits it: concat(q_latent, q_rope), read by nothing else
Q_INTO_MLA = P("attention.mla_absorbed", P("concat", Var("q_lat"), Var("q_rope"), dim=lambda d: d in (-1, 3), name="q"),
               Var("cache"), kv_lora_rank=ANY)


@TABLE.register("concat")
def _q_into_mla(ctx, node):
    """The region Q_INTO_MLA: the kernel reads the two query parts where they lie, so the concat is never
    launched."""
    m = ctx.region(Q_INTO_MLA, node, anchor="q")
    if m is None or m["q_lat"].type.shape[-1] != m.attr("kv_lora_rank"):
        return Decline("not the query concat(q_latent, q_rope) read only by attention.mla_absorbed")
    step = _mla_step(m.root, ctx, split_q=True)
    if isinstance(step, Decline):
        return step
    return Lowered(step.kind, f"{step.kernel}, q read in two parts (no concat)", nodes=tuple(m.nodes),
                   inputs=step.inputs, outputs=m.root.outputs, fn=step.fn)
