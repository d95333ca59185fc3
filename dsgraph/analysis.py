"""Graph analysis: networkx views and the summary users read before compiling
(op counts, parameters total and activated per token, FLOPs and KV bytes per token)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .dtypes import itemsize


def to_networkx(graph):
    """Nodes are graph nodes (by index) and inputs (by name); edges carry the value name."""
    import networkx as nx  # optional dependency (the [graph] extra): only this view needs it
    g = nx.DiGraph()
    producer = {}
    for name, v in graph.inputs.items():
        g.add_node(name, kind=v.kind, type=str(v.type))
        producer[id(v)] = name
    for i, node in enumerate(graph.nodes):
        g.add_node(i, op=node.op, attrs=dict(node.attrs))
        for v in node.inputs:
            g.add_edge(producer[id(v)], i, value=v.name)
        for v in node.outputs:
            producer[id(v)] = i
    return g


def numel(ty) -> int:
    n = 1
    for d in ty.shape:
        n *= d if isinstance(d, int) else 0
    return n


@dataclass
class Summary:
    name: str
    op_counts: Counter
    params: int
    activated_params: int
    param_bytes: int
    flops_per_token: int
    kv_bytes_per_token: int
    kv_values_per_token: int
    caches: dict = field(default_factory=dict)

    def __str__(self) -> str:
        ops = ", ".join(f"{op}×{n}" for op, n in sorted(self.op_counts.items()))
        return "\n".join([
            f"graph {self.name}",
            f"  parameters         {self.params / 1e9:,.2f} B ({self.params:,})",
            f"  activated / token  {self.activated_params / 1e9:,.2f} B ({self.activated_params:,}; "
            "routed experts counted top-k of E, embedding table excluded)",
            f"  weight bytes       {self.param_bytes / 2**30:,.2f} GiB",
            f"  FLOPs / token      {self.flops_per_token / 1e9:,.2f} GFLOP (matmuls, excl. attention over the cache)",
            f"  KV cache / token   {self.kv_values_per_token:,} values = {self.kv_bytes_per_token:,} bytes "
            f"({len(self.caches)} cache tensors)",
            f"  nodes              {sum(self.op_counts.values())}: {ops}",
        ])


def summarize(graph) -> Summary:
    """Totals from the graph alone (no weights needed)."""
    params = graph.params()
    total = sum(numel(v.type) for v in params.values())
    pbytes = sum(numel(v.type) * itemsize(v.type.dtype) for v in params.values())
    inactive = 0
    for node in graph.nodes:
        if node.op == "moe.experts":
            n_exp = node.attrs["num_experts"]
            k = node.inputs[2].type.shape[1]
            per_expert = sum(numel(v.type) for v in node.inputs[3:6])
            inactive += per_expert * (n_exp - k)
        elif node.op == "moe.grouped_gemm":
            e = node.inputs[1].type.shape[0]
            k = node.meta.get("top_k", e)
            inactive += numel(node.inputs[1].type) * (e - k) // e
    # an embedding lookup reads one row per token: the table is not "activated" compute
    embed = sum(numel(n.inputs[1].type) for n in graph.nodes
                if n.op == "embed" and n.inputs[1].is_input and len(n.inputs[1].users) == 1)
    activated = total - inactive - embed
    caches = {n: v for n, v in graph.inputs.items() if v.kind == "cache"}
    kv_vals = sum(numel(v.type.with_shape(v.type.shape[2:])) for v in caches.values())
    kv_bytes = sum(numel(v.type.with_shape(v.type.shape[2:])) * itemsize(v.type.dtype) for v in caches.values())
    return Summary(graph.name, Counter(n.op for n in graph.nodes), total, activated, pbytes,
                   2 * activated, kv_bytes, kv_vals,
                   {n: str(v.type) for n, v in caches.items()})
