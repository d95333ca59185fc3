"""`dsgraph show`: parameters (total / activated, MTP apart), layers, experts and the KV
cache per token for naive and absorbed MLA (and V3.2's indexer keys) — from the graph alone, no weights."""
from __future__ import annotations

from dataclasses import dataclass

from dsgraph.analysis import numel
from dsgraph.dtypes import itemsize


@dataclass
class ModelSummary:
    name: str
    family: str
    layers: int
    experts: str
    params: int
    activated: int
    mtp_params: int
    kv_naive: int | None       # values per token, all layers
    kv_absorbed: int | None
    kv_graph: int              # what this graph's caches hold
    dtype_bytes: int
    graph_summary: object
    kv_indexer: int | None = None   # V3.2's indexer key cache, values per token, all layers

    def __str__(self) -> str:
        g = self.graph_summary
        lines = [
            f"{self.name}  ({self.family}, {self.layers} layers, {self.experts})",
            f"  parameters        {_count(self.params)}   (+{_count(self.mtp_params).strip()} in the MTP module)",
            f"  activated/token   {_count(self.activated)}",
            f"  KV cache/token    {self.kv_graph:,} values in this graph",
        ]
        if self.kv_naive is not None:
            kib = self.kv_naive * self.dtype_bytes / 1024
            lines.append(f"    naive MLA       {self.kv_naive:,} values = {kib:,.1f} KiB"
                         f" ({self.kv_naive // self.layers:,} per layer)")
            lines.append(f"    absorbed MLA    {self.kv_absorbed:,} values = "
                         f"{self.kv_absorbed * self.dtype_bytes / 1024:,.1f} KiB ({self.kv_absorbed // self.layers:,} "
                         f"per layer, {self.kv_naive / self.kv_absorbed:.1f}x smaller)")
        if self.kv_indexer:
            total, kib = self.kv_absorbed + self.kv_indexer, self.dtype_bytes / 1024
            lines.append(f"    indexer keys    {self.kv_indexer:,} values = {self.kv_indexer * kib:,.1f} KiB "
                         f"({self.kv_indexer // self.layers:,} per layer); absorbed MLA + indexer {total:,} values "
                         f"= {total * kib:,.1f} KiB")
        ops = ", ".join(f"{op}×{n}" for op, n in sorted(g.op_counts.items()))
        lines.append(f"  graph             {sum(g.op_counts.values())} nodes: {ops}")
        return "\n".join(lines)


def _count(n: int) -> str:
    """671.07 B, 15.71 B, 3.41 M, 812 K: parameter counts at any scale."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:8.2f} {unit}"
    return f"{n:8d}  "


def model_summary(model) -> ModelSummary:
    c, g = model.config, model.graph
    s = g.summary()
    mtp_prefix = f"model.layers.{c.num_hidden_layers}."
    mtp = sum(numel(v.type) for n, v in g.params().items() if n.startswith(mtp_prefix))
    # the MTP embedding table is a lookup, excluded from the graph's activated count already
    mtp_inactive = sum(numel(v.type) for n, v in g.params().items() if n == f"{mtp_prefix}embed_tokens.weight")
    if mtp and c.is_moe:
        per_expert = 3 * c.hidden_size * c.moe_intermediate_size
        mtp_inactive += per_expert * (c.n_routed_experts - c.num_experts_per_tok)
    kv_naive = kv_abs = None
    if c.is_mla:
        kv_naive = c.num_hidden_layers * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim
                                                                   + c.v_head_dim)
        kv_abs = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim)
    experts = (f"{c.n_routed_experts} routed + {c.n_shared_experts} shared experts, top-{c.num_experts_per_tok}"
               if c.is_moe else "dense")
    main_layers_kv = sum(numel(v.type.with_shape(v.type.shape[2:])) for n, v in g.caches().items()
                         if not n.startswith("cache.mtp"))
    return ModelSummary(model.name, c.model_type, c.num_hidden_layers, experts, s.params - mtp,
                        s.activated_params - (mtp - mtp_inactive), mtp, kv_naive, kv_abs, main_layers_kv,
                        itemsize(g.params()["model.embed_tokens.weight"].type.dtype), s,
                        c.num_hidden_layers * c.index_head_dim if c.is_dsa else None)
