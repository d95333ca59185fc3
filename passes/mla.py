"""MLA absorption (DeepSeek-V2/V3 inference form).

kv_b_proj [H*(dn+dv), C] splits per head into W_UK [H, dn, C] and W_UV [H, dv, C].
`absorb_mla` (runtime-bmm form) rewrites the naive block

    k, v = mla.decompress(c_kv, k_pe, kv_b);  k_all = cache.append(cache.L.k, k); v_all = ...
    o = attention.mla(concat(q_nope, q_pe), k_all, v_all)
into
    q_lat  = einsum("bshd,hdc->bshc", q_nope, W_UK)
    latent = cache.append(cache.L.latent [B,T,C+R], concat(c_kv, k_pe))
    o      = einsum("bshc,hdc->bshd", attention.mla_absorbed(concat(q_lat, q_pe), latent), W_UV)

so the cache holds C+R values per token per layer instead of H*(dn+R+dv). V3.2's sparse form,
attention.mla_sparse(q, k_all, v_all, indices), becomes attention.mla_sparse_absorbed(q, latent, indices) the
same way (the indexer and its key cache are untouched).
`absorb_mla_premultiplied` then folds W_UK into q_b_proj / q_proj and W_UV into o_proj
offline, leaving no per-step einsum. FP8 weights are dequantised where they are folded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsgraph.errors import PassError
from dsgraph.ir import Graph
from dsgraph.pattern import ANY, P, Var
from dsgraph.rewriter import Rewrite
from dsgraph.weights import WeightStore

from .base import register
from .fusion import PatternPass
from .weightref import dense_param, weight_ref

Q_ABS, O_ABS = "bshd,hdc->bshc", "bshc,hdc->bshd"


def _latent_name(k_cache: str) -> str:
    return (k_cache[:-2] if k_cache.endswith(".k") else k_cache) + ".latent"


@register
@dataclass
class AbsorbMLA(PatternPass):
    """Naive MLA -> absorbed MLA over the latent cache (runtime-bmm form); see the module docstring.

    Replaces each layer's per-head K/V cache inputs and outputs by one latent cache `cache.L.latent`
    [B, T, kv_lora_rank + rope_dim] (graph.cache_map updated). Adds params `<kv_b_proj>.w_uk` and
    `.w_uv`, derived lazily from kv_b_proj (dequantised if FP8).
    """

    name = "absorb_mla"
    description = "MLA absorption, runtime-bmm form: W_UK into the query, W_UV after attention, latent cache"

    def rewrites(self, graph: Graph, weights: WeightStore) -> list[Rewrite]:
        ckv, kpe, kvb = Var("ckv"), Var("kpe"), Var("kvb")
        kc, vc = Var("kc", kind="cache"), Var("vc", kind="cache")
        operands = (P("concat", Var("q_nope"), Var("q_pe"), dim=lambda d: d in (-1, 3)),
                    P("cache.append", kc, P("mla.decompress", ckv, kpe, kvb, out=0, name="dec", num_heads=ANY,
                                            qk_nope_dim=ANY, v_dim=ANY), name="k_all", single_use=False),
                    P("cache.append", vc, P("mla.decompress", ckv, kpe, kvb, out=1), name="v_all",
                      single_use=False))
        dense = P("attention.mla", *operands, scale=ANY, causal=ANY)
        sparse = P("attention.mla_sparse", *operands, Var("idx"), scale=ANY, causal=ANY)

        def build(b, m):
            ref = weight_ref(m["kvb"])
            k_out = graph.cache_map.get(m["kc"].name)
            v_out = graph.cache_map.get(m["vc"].name)
            h, dn, dv = (m.attr(a, "dec") for a in ("num_heads", "qk_nope_dim", "v_dim"))
            if ref is None or m["q_nope"].shape[-1] != dn or graph.outputs.get(k_out) is not m["k_all"] \
                    or graph.outputs.get(v_out) is not m["v_all"]:
                return None
            c, r, dtype = m["ckv"].shape[-1], m["kpe"].shape[-1], m["ckv"].dtype
            w_uk = dense_param(b, weights, f"{ref.base}.w_uk", (h, dn, c), dtype,
                               lambda w: w.view(h, dn + dv, c)[:, :dn], ref)
            w_uv = dense_param(b, weights, f"{ref.base}.w_uv", (h, dv, c), dtype,
                               lambda w: w.view(h, dn + dv, c)[:, dn:], ref)
            q = b.concat(b.einsum(m["q_nope"], w_uk, equation=Q_ABS), m["q_pe"], dim=-1)
            bsz, seq = m["ckv"].shape[:2]
            new = b.concat(m["ckv"], b.reshape(m["kpe"], shape=(bsz, seq, r)), dim=-1)
            name = _latent_name(m["kc"].name)
            cache = b.cache_input(name, m["kc"].shape[:2] + (c + r,), dtype)
            latent = b.cache.append(cache, new)
            b.retire_cache(m["kc"])
            b.retire_cache(m["vc"])
            b.output(f"{name}.next", latent, cache_of=cache)
            attrs = {"scale": m.attr("scale"), "causal": m.attr("causal"), "kv_lora_rank": c}
            o = (b.attention.mla_sparse_absorbed(q, latent, m["idx"], **attrs) if "idx" in m
                 else b.attention.mla_absorbed(q, latent, **attrs))
            return {m.root_value: b.einsum(o, w_uv, equation=O_ABS)}

        return [Rewrite("absorb", dense, build), Rewrite("absorb_sparse", sparse, build)]

    def run(self, graph: Graph, weights: WeightStore) -> dict:
        stats = super().run(graph, weights)
        stats["caches_removed"] = len(graph.remove_unused_inputs(("cache",)))
        return stats


def _fold_q(w_q: torch.Tensor, w_uk: torch.Tensor, h: int, dn: int, dr: int) -> torch.Tensor:
    """q weight [H*(dn+dr), K] and W_UK [H, dn, C] -> [H*(C+dr), K]: per head [W_UK^T @ W_q_nope | W_q_rope]."""
    wq = w_q.view(h, dn + dr, -1)
    absorbed = torch.einsum("hdc,hdk->hck", w_uk, wq[:, :dn])
    return torch.cat((absorbed, wq[:, dn:]), dim=1).reshape(-1, wq.shape[-1])


def _fold_o(w_o: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """o_proj [D, H*dv] and W_UV [H, dv, C] -> [D, H*C]."""
    h, dv, c = w_uv.shape
    return torch.einsum("ohd,hdc->ohc", w_o.view(w_o.shape[0], h, dv), w_uv).reshape(w_o.shape[0], h * c)


@register
@dataclass
class AbsorbMLAPremultiplied(PatternPass):
    """Absorbed MLA with W_UK folded into q_b_proj (or q_proj) and W_UV into o_proj offline:
    params `<q_b_proj>.absorbed` [H*(C+dr), q_in] and `<o_proj>.absorbed` [D, H*C].

    Needs `absorb_mla` first (it matches the einsums absorb_mla emits); run as
    ["absorb_mla", "absorb_mla_premultiplied"].
    """

    name = "absorb_mla_premultiplied"
    description = "MLA absorption with W_UK/W_UV pre-multiplied into q_b_proj/q_proj and o_proj"
    requires = ("absorb_mla",)

    def check_preconditions(self, graph: Graph) -> None:
        if graph.find("attention.mla") or graph.find("attention.mla_sparse"):
            raise PassError("absorb_mla_premultiplied needs absorb_mla first: the graph still has naive "
                            "attention.mla nodes; run the pipeline ['absorb_mla', 'absorb_mla_premultiplied']")

    def rewrites(self, graph: Graph, weights: WeightStore) -> list[Rewrite]:
        uk, uv = Var("w_uk", kind="param"), Var("w_uv", kind="param")
        q_split = P("split", P("reshape", P("linear", Var("xq"), Var("wq")), shape=ANY), out=0, name="q_nope",
                    single_use=False, sizes=ANY, dim=lambda d: d in (-1, 3))
        q_rule = P("einsum", q_split, uk, equation=Q_ABS)
        o_rule = P("linear", P("reshape", P("einsum", Var("o_lat"), uv, equation=O_ABS), shape=ANY), Var("wo"))

        def build_q(b, m):
            ref = weight_ref(m["wq"])
            split = m.node("q_nope")
            if ref is None or len(split.attrs["sizes"]) != 2:
                return None
            (h, dn, c), dr = m["w_uk"].shape, split.outputs[1].shape[-1]
            w = dense_param(b, weights, f"{ref.base}.absorbed", ((c + dr) * h, ref.value.shape[1]),
                            m["xq"].dtype, lambda wq, wuk: _fold_q(wq, wuk, h, dn, dr), ref, weight_ref(m["w_uk"]))
            bsz, seq = split.outputs[0].shape[:2]
            q_lat, q_pe = b.split(b.reshape(b.linear(m["xq"], w), shape=(bsz, seq, h, c + dr)), sizes=(c, dr), dim=-1)
            return {m.root_value: q_lat, split.outputs[1]: q_pe}

        def build_o(b, m):
            ref = weight_ref(m["wo"])
            if ref is None:
                return None
            h, dv, c = m["w_uv"].shape
            w = dense_param(b, weights, f"{ref.base}.absorbed", (ref.value.shape[0], h * c), m["o_lat"].dtype,
                            _fold_o, ref, weight_ref(m["w_uv"]))
            bsz, seq = m["o_lat"].shape[:2]
            return {m.root_value: b.linear(b.reshape(m["o_lat"], shape=(bsz, seq, h * c)), w)}

        return [Rewrite("fold_w_uk", q_rule, build_q), Rewrite("fold_w_uv", o_rule, build_o)]
