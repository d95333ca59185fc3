"""FP8 latent KV cache (`kv_cache_dtype="fp8"`): absorbed MLA's latent cache [B,T,C+R] becomes three caches holding
FlashMLA's FP8 row -- `cache.L.latent_fp8` [B,T,C] e4m3, `cache.L.latent_scale` [B,T,C/group] fp32 and
`cache.L.latent_rope` [B,T,R] in the compute dtype -- 656 bytes a token for V3's C=512, R=64 in bf16 (1152 before).

    latent = cache.append(cache.L.latent, new);  o = attention(q, latent, ...)
into
    nope, rope = split(new, (C, R));  q8, s = kv.quant_fp8(nope)
    latent = concat(kv.dequant_fp8(append(fp8, q8), append(scale, s)), append(rope_cache, rope))
    o = attention(q, latent, ...)

for attention.mla_absorbed and V3.2's attention.mla_sparse_absorbed alike. Lossy by design (e4m3 keeps 3 mantissa
bits): the proof harness compares it within `tolerance`. Needs `absorb_mla` first. `fp8_index_cache` does the
same for V3.2's indexer key cache, in the reference's own format (rotated e4m3 keys, one fp32 scale per 128).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dsgraph.errors import PassError
from dsgraph.ir import Graph
from dsgraph.pattern import P, Var
from dsgraph.rewriter import Rewrite
from dsgraph.weights import WeightStore

from .base import register
from .fusion import PatternPass

_ABSORBED = ("attention.mla_absorbed", "attention.mla_sparse_absorbed")


@register
@dataclass
class FP8LatentCache(PatternPass):
    """Store absorbed MLA's latent cache as e4m3 NoPE values + fp32 group scales + RoPE values (module docstring).
    `group` values share a scale (128 as in FlashMLA; a latent narrower than that, or not a multiple, uses one
    scale per row)."""

    name = "fp8_latent_cache"
    description = "absorbed MLA's latent cache in FP8 (e4m3 NoPE + fp32 scales + RoPE), dequantised for attention"
    requires = ("absorb_mla",)
    tolerance: ClassVar[float] = 5e-2   # e4m3 rounding of the cached latent, through every layer to the logits
    group: int = 128

    def check_preconditions(self, graph: Graph) -> None:
        if graph.find("attention.mla") or graph.find("attention.mla_sparse"):
            raise PassError("fp8_latent_cache needs absorb_mla first: the graph still has naive MLA attention; run "
                            "['absorb_mla', 'fp8_latent_cache']")

    def rewrites(self, graph: Graph, weights: WeightStore) -> list[Rewrite]:
        kc = Var("kc", kind="cache", where=lambda v: v.name.endswith(".latent"))
        pattern = P(_ABSORBED, Var("q"), P("cache.append", kc, Var("new"), name="app", single_use=False),
                    rest="extra")

        def build(b, m):
            app, att = m.node("app"), m.root
            c = att.attrs["kv_lora_rank"]
            bsz, t, width = m["kc"].shape
            if graph.outputs.get(graph.cache_map.get(m["kc"].name)) is not app.outputs[0]:
                return None
            group = self.group if c % self.group == 0 else c
            nope, rope = b.split(m["new"], sizes=(c, width - c), dim=-1)
            q8, scale = b.kv.quant_fp8(nope, group=group)
            base, dtype = m["kc"].name, m["kc"].dtype
            parts = []
            for suffix, value, shape in (("fp8", q8, (c,)), ("scale", scale, (c // group,)), ("rope", rope, None)):
                cache = b.cache_input(f"{base}_{suffix}", (bsz, t) + (shape or (width - c,)), value.dtype)
                parts.append(b.cache.append(cache, value))
                b.output(f"{base}_{suffix}.next", parts[-1], cache_of=cache)
            b.retire_cache(m["kc"])
            latent = b.concat(b.kv.dequant_fp8(parts[0], parts[1], group=group, dtype=dtype), parts[2], dim=-1)
            return {m.root_value: b.op(att.op, m["q"], latent, *m["extra"], **att.attrs)}

        return [Rewrite("fp8_latent", pattern, build)]

    def run(self, graph: Graph, weights: WeightStore) -> dict:
        stats = super().run(graph, weights)
        stats["caches_removed"] = len(graph.remove_unused_inputs(("cache",)))
        return stats


@register
@dataclass
class FP8IndexCache(PatternPass):
    """V3.2's indexer key cache as DeepSeek's reference keeps it: each new key Hadamard-rotated and stored as e4m3
    with its fp32 power-of-two scale (`cache.L.index_k_fp8` [B,T,D], `cache.L.index_k_scale` [B,T,D/128]: 132
    bytes a token for D = 128 instead of 256 in bf16), and the scores computed from it with the reference's FP8
    numerics (indexer.logits_fp8, which equals indexer.logits(fp8=True) on the same keys). Lossy against the
    default bf16 scores: e4m3 rounding can reorder close logits and so change a top-k pick."""

    name = "fp8_index_cache"
    description = "V3.2's indexer key cache in FP8 (rotated e4m3 + fp32 scale per token), FP8 indexer scores"
    tolerance: ClassVar[float] = 5e-2

    def rewrites(self, graph: Graph, weights: WeightStore) -> list[Rewrite]:
        kc = Var("kc", kind="cache", where=lambda v: v.name.endswith(".index_k"))
        pattern = P("indexer.logits", Var("q"), P("cache.append", kc, Var("new"), name="app", single_use=False),
                    Var("w"))

        def build(b, m):
            app, logits = m.node("app"), m.root
            bsz, t, d = m["kc"].shape
            if graph.outputs.get(graph.cache_map.get(m["kc"].name)) is not app.outputs[0] \
                    or len(app.outputs[0].users) != 1 or not isinstance(d, int) or d & (d - 1) or d > 128 and d % 128:
                return None
            parts = []
            for suffix, value in zip(("fp8", "scale"), b.indexer.quant_fp8(m["new"])):
                cache = b.cache_input(f"{m['kc'].name}_{suffix}", (bsz, t, value.shape[-1]), value.dtype)
                parts.append(b.cache.append(cache, value))
                b.output(f"{m['kc'].name}_{suffix}.next", parts[-1], cache_of=cache)
            b.retire_cache(m["kc"])
            return {m.root_value: b.indexer.logits_fp8(m["q"], *parts, m["w"], scale=logits.attrs["scale"],
                                                       causal=logits.attrs["causal"])}

        return [Rewrite("fp8_index_keys", pattern, build)]

    def run(self, graph: Graph, weights: WeightStore) -> dict:
        stats = super().run(graph, weights)
        stats["caches_removed"] = len(graph.remove_unused_inputs(("cache",)))
        return stats
