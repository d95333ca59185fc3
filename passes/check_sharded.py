"""The proof of a ParallelPlan: every rank's sharded graph, run together by the multi-rank interpreter (simulated
collectives, one process), against the unsharded graph on the same random inputs, for prefill and one cached
decode step — `passes.check`'s harness for graphs that are many.

Outputs other than caches are compared: with a replicated batch every rank's output must equal the unsharded
one; with DP attention (`graph.meta["shard"]["batch_split"]`) the batch is cut into plan.dp pieces and rank r
(of DP group r // tp) holds piece r // tp of every activation, cache and output, so for each TP rank the pieces'
outputs are concatenated first. Each graph's decode step reads the
caches its own prefill wrote (the ranks' caches hold their own heads or requests).
"""
from __future__ import annotations

import torch

from dsgraph.interpreter import Interpreter
from dsgraph.ir import Graph
from dsgraph.multirank import MultiRankInterpreter
from dsgraph.numerics import rel_err
from dsgraph.parallel import ParallelPlan
from dsgraph.weights import WeightStore

from .check import CheckResult, _empty_caches, _tolerance, make_inputs
from .manager import run_pipeline
from .shard import shard_all


def shard_pipeline(graph: Graph, weights: WeightStore, plan: ParallelPlan, pipeline=()):
    """Every rank's (graph, weights, pass records): the shard pass, then `pipeline` per rank."""
    out = []
    for g, w in shard_all(graph, weights, plan):
        g, w, records = run_pipeline(g, w, list(pipeline))
        out.append((g, w, records))
    return out


def check_sharded(graph: Graph, weights: WeightStore, plan: ParallelPlan, pipeline=(), batch: int | None = None,
                  seq: int = 5, seed: int = 0, rtol: float | None = None) -> CheckResult:
    ranks = shard_pipeline(graph, weights, plan, pipeline)
    split_batch, dp = plan.dp_attention, plan.dp
    batch = batch or (dp if split_batch else 2)
    res = CheckResult([f"shard[{plan}]", *(r.name for r in ranks[0][2])],
                      rtol if rtol is not None else _tolerance(graph, []), changed=True)
    gen = torch.Generator().manual_seed(seed)
    ref = Interpreter(graph, weights)
    multi = MultiRankInterpreter([g for g, _, _ in ranks], [w for _, w, _ in ranks])
    acts = make_inputs([graph], weights, batch, seq, 0, gen)
    local = batch // dp
    c_ref = _empty_caches(graph, batch)
    c_ranks = [_empty_caches(g, local) for g, _, _ in ranks]
    with torch.no_grad():
        for step in ("prefill", "decode"):
            want = ref.run({**{k: acts[k] for k in graph.activations()}, **c_ref})
            feeds = [{**_piece(acts, r // plan.tp % dp, dp, g), **c} for r, ((g, _, _), c) in
                     enumerate(zip(ranks, c_ranks))]
            got = multi.run(feeds)
            for name, t in want.items():
                if name in graph.cache_map.values():
                    continue
                outs = [o[name] for o in got]
                if split_batch:  # TP rank t of every DP group, pieces in order
                    outs = [torch.cat(outs[t::plan.tp], dim=0) for t in range(plan.tp)]
                res.errors[f"{step}:{name}"] = max(rel_err(o, t) for o in outs)
            c_ref = {k: want[v] for k, v in graph.cache_map.items()}
            c_ranks = [{k: o[v] for k, v in g.cache_map.items()} for (g, _, _), o in zip(ranks, got)]
            acts = make_inputs([graph], weights, batch, 1, seq, gen)
    return res


def _piece(acts: dict, group: int, dp: int, graph: Graph) -> dict:
    """DP group `group`'s piece (of dp) of the batch of every activation `graph` takes."""
    return {k: t.chunk(dp, dim=0)[group].contiguous() for k, t in acts.items() if k in graph.inputs}
