"""The `shard` pass: rank `rank`'s graph of a ParallelPlan (the machinery is in shard_core.py, the per-op rules in
shard_rules.py). `shard_all` gives every rank's (graph, weights), which the multi-rank proof
(`passes.check_sharded`) and the sharded runtime use."""
from __future__ import annotations

from dataclasses import dataclass, field

from dsgraph.errors import PassError
from dsgraph.ir import Graph
from dsgraph.parallel import ParallelPlan
from dsgraph.weights import WeightStore

from .base import Pass, register
from .shard_core import REP, Sharder
from .shard_rules import RULES, default_rule


@register
@dataclass
class Shard(Pass):
    """Rank `rank`'s graph of `plan`. Preconditions: the builder's form (naive MLA, per-expert MoE) and a plan
    that divides the model's dims (checked against graph.meta['config'], naming the dim)."""

    name = "shard"
    description = "one rank's graph of a ParallelPlan: TP/EP/DP-attention sharding with collectives inserted"
    plan: ParallelPlan = field(default_factory=ParallelPlan)
    rank: int = 0

    def check_preconditions(self, graph: Graph) -> None:
        if not 0 <= self.rank < self.plan.world:
            raise PassError(f"shard: rank {self.rank} is outside {self.plan} (world {self.plan.world})")
        for op in ("attention.mla_absorbed", "moe.grouped_gemm"):
            if graph.find(op):
                raise PassError(f"shard runs on the builder's form; this graph already has {op}: shard first, "
                                "then absorb_mla / group_moe per rank")
        if graph.meta.get("config"):
            self.plan.check(graph.meta["config"], graph.name)

    def run(self, graph: Graph, weights: WeightStore) -> dict:
        sh = Sharder(graph.copy(), weights.copy(), self.plan, self.rank)
        src = sh.src
        for v in src.activations().values():
            sh.get(v)
        for node in src.nodes:
            if id(node) not in sh.weight_nodes:
                RULES.get(node.op, default_rule)(sh, node)
        caches = set(src.cache_map.values())
        for name, v in src.outputs.items():
            new, layout = sh.get(v)
            if name in caches:
                sh.cache_layouts[name] = str(layout)
            sh.g.set_output(name, new if name in caches else sh.convert(new, layout, REP))
        sh.g.cache_map = dict(src.cache_map)
        sh.g.meta.update({k: v for k, v in src.meta.items() if k not in sh.g.meta})
        sh.g.meta["shard"] = {"plan": self.plan.to_dict(), "rank": self.rank, "params": sh.slices,
                              "caches": sh.cache_layouts, "batch_split": self.plan.dp_attention}
        sh.g.remove_unused_inputs(("param",))
        graph.__dict__.update(sh.g.__dict__)  # the pass's own copy becomes the new graph
        for name in list(weights):  # the store the pass was given holds this rank's weights only
            weights.pop(name)
        for name in sh.new_weights:
            weights.set(name, sh.new_weights.entry(name))
        return {"rewritten": len(sh.g.nodes), "collectives": sum(n.op.startswith("dist.") for n in sh.g.nodes),
                "sliced_params": len(sh.slices)}


def shard_all(graph: Graph, weights: WeightStore, plan: ParallelPlan) -> list[tuple[Graph, WeightStore]]:
    """Every rank's (graph, weights) of `plan`."""
    out = []
    for rank in range(plan.world):
        res = Shard(plan=plan, rank=rank)(graph, weights)
        out.append((res.graph, res.weights))
    return out
