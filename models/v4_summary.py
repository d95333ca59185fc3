"""`dsgraph show` for DeepSeek-V4: parameters (MXFP4 bytes counted as their two values), activated parameters per
token, and the KV cache per layer type — what each kind holds per token of context, per layer, in the compact
layout (compressed entries once per group), next to what this graph's caches hold (the same, counted from their
types: the check that the graph is compact)."""
from __future__ import annotations

from dataclasses import dataclass

from dsgraph.analysis import numel
from dsgraph.dtypes import itemsize

from .v4_config import CSA, HCA, SLIDING


@dataclass
class V4Summary:
    name: str
    layers: int
    experts: str
    params: int
    activated: int
    mtp_params: int      # the MTP block's own (embed and head are shared), outside params / activated
    kinds: dict          # layer type -> (layers, values per token of context per layer, fixed values per layer)
    graph_values_per_token: float
    dtype_bytes: int

    def __str__(self) -> str:
        kib = self.dtype_bytes / 1024
        lines = [f"{self.name}  (deepseek_v4, {self.layers} layers, {self.experts})",
                 f"  parameters        {self.params / 1e9:8.2f} B   (+{self.mtp_params / 1e9:.2f} B in the MTP block)",
                 f"  activated/token   {self.activated / 1e9:8.2f} B",
                 "  KV cache per layer type (compact layout; values x "
                 f"{self.dtype_bytes} bytes):"]
        for kind, (n, per_token, fixed) in self.kinds.items():
            lines.append(f"    {kind:<30} {n:3d} layers  {per_token:9.2f} values/token = {per_token * kib:7.3f} "
                         f"KiB/token per layer, + {fixed:,} values fixed (window and compressor state)")
        total = sum(n * v for n, v, _ in self.kinds.values())
        lines.append(f"    all layers                     {total:,.1f} values/token = {total * kib:,.2f} KiB/token")
        lines.append(f"  this graph's caches (T//m compressed entries) {self.graph_values_per_token:,.1f} values/token")
        return "\n".join(lines)


def _values(v) -> int:
    """Weights a param stands for: MXFP4 packs two per int8 byte; e8m0 scales are metadata, not weights."""
    return 0 if v.type.dtype == "uint8" else numel(v.type) * (2 if v.type.dtype == "int8" else 1)


def graph_values_per_token(graph, context: int = 2 ** 20) -> float:
    """Cache values per token of context of one request in the graph's own cache types (the MTP block's aside),
    over `context` tokens (a multiple of every ratio: T//m is exact there)."""
    main = [v for n, v in graph.caches().items() if not n.startswith("cache.mtp")]

    def at(t: int) -> int:
        return sum(v.type.numel({"B": 1, "T": t}) for v in main)
    return (at(context) - at(0)) / context


def v4_summary(model) -> V4Summary:
    c, g = model.config, model.graph
    params = {n: _values(v) for n, v in g.params().items()}
    mtp = sum(v for n, v in params.items() if n.startswith("mtp."))
    total = sum(params.values()) - mtp
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    inactive = c.num_hidden_layers * per_expert * (c.n_routed_experts - c.num_experts_per_tok)
    inactive += params["embed.weight"]
    hd, di = c.head_dim, c.index_head_dim
    kinds = {}
    for kind in (SLIDING, CSA, HCA):
        n = c.layer_types.count(kind)
        if not n:
            continue
        m = c.compress_rates.get(kind, 0)
        per_token = hd / m + (di / m if kind == CSA else 0) if m else 0.0
        width = {CSA: 2 * (2 * hd) * (2 * m - 1) + 2 * (2 * di) * (2 * m - 1), HCA: 2 * hd * (m - 1)}.get(kind, 0)
        kinds[kind] = (n, per_token, (c.sliding_window - 1) * hd + width)
    grows = graph_values_per_token(g)
    experts = f"{c.n_routed_experts} routed + {c.n_shared_experts} shared experts, top-{c.num_experts_per_tok}"
    return V4Summary(model.name, c.num_hidden_layers, experts, total, total - inactive, mtp, kinds, grows,
                     itemsize(g.meta.get("dtype", "float32")))
