"""Attention: the flash prefill template (attention.gqa / attention.mla) and the absorbed-MLA split-KV decode
template (attention.mla_absorbed). Both kernels live in kernels/flash_attention.py and kernels/mla_decode.py."""
from __future__ import annotations

import importlib

from .. import decode_graphs
from .registry import Decline, Lowered, lowering


def _kernel(ctx, module: str, fn: str, dtype: str):
    if ctx.interpreting and dtype == "bfloat16":
        return Decline("Triton's interpreter computes bf16 tl.dot wrongly; bf16 attention runs on CUDA")
    try:
        return getattr(importlib.import_module(f"backends.triton.kernels.{module}"), fn)
    except (ImportError, AttributeError) as e:
        return Decline(f"attention template {module}.{fn} is not available ({e})")


@lowering("attention.gqa", "attention.mla")
def _flash(node, ctx):
    fn = _kernel(ctx, "flash_attention", "flash_attention", node.inputs[0].dtype)
    if isinstance(fn, Decline):
        return fn
    scale, causal = node.attrs["scale"], node.attrs["causal"]
    cached = _reads_cache(node)

    def run(a, sym):
        static = decode_graphs.active() if cached else None  # CUDA-graph decode: the valid length is on the device
        return [fn(a[0], a[1], a[2], scale, causal, kv_lens=None if static is None else static.lens)]
    return Lowered(run, "template", "flash_attention._flash_attention_kernel")


def _reads_cache(node) -> bool:
    """Whether the node's keys come from `cache.append` (so a static-capacity step must mask by length)."""
    return any(v.node is not None and v.node.op == "cache.append" for v in node.inputs[1:])


def _mla_step(attn, ctx, split_q: bool):
    """The absorbed-MLA decode template for `attn`; with split_q its step takes (q latent, q rope, cache)."""
    fn = _kernel(ctx, "mla_decode", "mla_absorbed", attn.inputs[0].dtype)
    if isinstance(fn, Decline):
        return fn
    scale, causal, rank = attn.attrs["scale"], attn.attrs["causal"], attn.attrs["kv_lora_rank"]
    cached = _reads_cache(attn)

    def run(a, sym):
        q, q_rope, cache = (a[0], a[1], a[2]) if split_q else (a[0], None, a[1])
        static = decode_graphs.active() if cached else None  # CUDA-graph decode: the valid length is on the device
        if static is None:
            return [fn(q, cache, scale, rank, causal=causal, q_rope=q_rope)]
        # the static buffers start zeroed and only ever receive computed rows, so rows past a length are finite
        return [fn(q, cache, scale, rank, cache_lens=static.lens, causal=causal, tune=not ctx.interpreting,
                   q_rope=q_rope, finite_tail=True)]
    return Lowered(run, "template", f"mla_decode._mla_decode_kernel (split-KV){_gluon_note(attn, ctx)}")


def _gluon_note(attn, ctx) -> str:
    """What the report says of the Hopper Gluon kernel, which `mla_absorbed` picks per call where it fits."""
    from ..kernels.mla_decode import hopper
    try:
        from ..kernels.mla_decode_gluon import shape_unfit
    except ImportError as e:
        return f"; Gluon kernel off (this Triton has no Gluon Hopper ops: {e})" if hopper(ctx.device) else ""
    heads, rank = attn.inputs[0].type.shape[2], attn.attrs["kv_lora_rank"]
    if not isinstance(heads, int) or shape_unfit(1, heads, rank, attn.inputs[0].type.shape[3] - rank):
        return ""  # outside the kernel's shapes: no note
    if not hopper(ctx.device):
        return "; Gluon kernel off (needs an sm_90 GPU)"
    return ("; CUDA-graph decode steps whose batch fills the GPU: mla_decode_gluon._mla_decode_gluon (Hopper, "
            "warp-specialised), where the tuner confirms it")


@lowering("attention.mla_absorbed")
def _mla(node, ctx):
    return _mla_step(node, ctx, split_q=False)


@lowering("concat")
def _q_into_mla(node, ctx):
    """concat(q_latent, q_rope) read only by attention.mla_absorbed as its query (what `absorb_mla` emits): the
    kernel reads the two parts where they lie, so the concat is never launched. A region of both nodes."""
    attn = ctx.sole_user(node.outputs[0])
    if (attn is None or attn.op != "attention.mla_absorbed" or attn.inputs[0] is not node.outputs[0]
            or len(node.inputs) != 2 or node.attrs["dim"] not in (-1, 3)
            or node.inputs[0].type.shape[-1] != attn.attrs["kv_lora_rank"]
            or not ctx.free(attn) or not ctx.region_ok([node, attn])):
        return None
    step = _mla_step(attn, ctx, split_q=True)
    if isinstance(step, Decline):
        return None
    return Lowered(step.fn, step.kind, f"{step.kernel}, q read in two parts (no concat)", nodes=(node, attn),
                   inputs=(node.inputs[0], node.inputs[1], attn.inputs[1]), outputs=attn.outputs)
