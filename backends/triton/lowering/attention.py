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


@lowering("attention.mla_absorbed")
def _mla(node, ctx):
    fn = _kernel(ctx, "mla_decode", "mla_absorbed", node.inputs[0].dtype)
    if isinstance(fn, Decline):
        return fn
    scale, causal, rank = node.attrs["scale"], node.attrs["causal"], node.attrs["kv_lora_rank"]

    cached = _reads_cache(node)

    def run(a, sym):
        static = decode_graphs.active() if cached else None  # CUDA-graph decode: the valid length is on the device
        if static is None:
            return [fn(a[0], a[1], scale, rank, causal=causal)]
        return [fn(a[0], a[1], scale, rank, cache_lens=static.lens, causal=causal, tune=not ctx.interpreting)]
    return Lowered(run, "template", "mla_decode._mla_decode_kernel (split-KV)")
