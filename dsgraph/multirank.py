"""All ranks of a sharded model in one process: the oracle for sharding passes, with no processes or GPUs.

`MultiRankInterpreter` holds one `Interpreter` per rank (each with its own graph and weights) and walks their
plans in lockstep: an ordinary step runs on every rank from that rank's values; a collective step
(`dsgraph.ops.dist`) gathers its inputs from every rank and computes every rank's outputs at once with the op's
simulated semantics (`SIMULATE`), per group: a collective over G < world ranks runs on each contiguous block of G
ranks (tensor parallelism inside expert parallelism), as `torch.distributed.new_subgroups` cuts them. Each
rank's outputs are checked against its own types (binding its own symbols: an all_to_all's row count differs by
rank). Ranks' graphs must line up collective for collective, as
SPMD programs do; the constructor checks that and names the first mismatch.
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

import torch

from .errors import DSGraphError
from .interpreter import Interpreter, Step, _checked, _graph_values
from .ir import Graph
from .ops.dist import COLLECTIVES, SIMULATE


def _collective_nodes(graph: Graph) -> list:
    return [n for n in graph.nodes if n.op in COLLECTIVES]


def _shape_free(attrs: dict) -> dict:
    """A collective's attrs but an all_to_all's received row count, which may differ by rank (uneven top-k
    slots of a TP group's ranks)."""
    return {k: v for k, v in attrs.items() if k != "rows"}


class MultiRankInterpreter:
    """Runs `graphs[r]` with `weights[r]` for every rank r; `run` takes and returns one dict per rank."""

    def __init__(self, graphs: Sequence[Graph], weights: Sequence[Mapping[str, torch.Tensor]],
                 device: str | torch.device = "cpu"):
        if len(graphs) != len(weights) or not graphs:
            raise DSGraphError(f"MultiRankInterpreter: {len(graphs)} graphs for {len(weights)} weight maps")
        self.ranks = [Interpreter(g, w, device) for g, w in zip(graphs, weights)]
        self.world = len(graphs)
        self.moved: Counter = Counter()  # payload bytes rank 0 handed to each collective op, over all runs
        first = _collective_nodes(graphs[0])
        for r, g in enumerate(graphs[1:], 1):
            mine = _collective_nodes(g)
            for a, b in zip(first, mine):
                if a.op != b.op or _shape_free(a.attrs) != _shape_free(b.attrs):
                    raise DSGraphError(f"rank {r} runs {b.format(4)} where rank 0 runs {a.format(4)}: "
                                       "ranks' graphs must issue the same collectives in the same order")
            if len(mine) != len(first):
                raise DSGraphError(f"rank {r} issues {len(mine)} collectives, rank 0 {len(first)}")
        for a in first:
            if self.world % a.attrs["group_size"]:
                raise DSGraphError(f"{a.format(4)} runs over {a.attrs['group_size']} ranks, which do not tile the "
                                   f"interpreter's {self.world}")

    def run(self, inputs: Sequence[Mapping[str, torch.Tensor]], record: bool = False) -> list:
        """[{output name: tensor}] per rank; with `record`, [(outputs, {value name: tensor})] per rank."""
        if len(inputs) != self.world:
            raise DSGraphError(f"MultiRankInterpreter.run: {len(inputs)} input dicts for {self.world} ranks")
        syms = [it.check_inputs(x) for it, x in zip(self.ranks, inputs)]
        envs = []
        for it, x in zip(self.ranks, inputs):
            env = dict(it.consts)
            env.update({id(v): x[n].to(it.device) for n, v in it.runtime_inputs.items()})
            envs.append(env)
        records = [_graph_values(it.graph, env) if record else None for it, env in zip(self.ranks, envs)]
        queues = [self._segments(it) for it in self.ranks]
        for i in range(len(queues[0])):
            self._run_segment([q[i] for q in queues], envs, syms, records)
        outs = [{k: env[id(v)] for k, v in it.graph.outputs.items()} for it, env in zip(self.ranks, envs)]
        return list(zip(outs, records)) if record else outs

    @staticmethod
    def _segments(it: Interpreter) -> list[list[tuple[int, Step, object]]]:
        """The plan cut before and after each collective: [[steps...], [collective], [steps...], ...]."""
        segs: list[list] = [[]]
        for i, (step, node) in enumerate(zip(it.steps, it.graph.nodes)):
            if node.op in COLLECTIVES:
                segs += [[(i, step, node)], []]
            else:
                segs[-1].append((i, step, node))
        return segs

    def _run_segment(self, segs, envs, syms, records) -> None:
        coll = segs[0][0][2].op in COLLECTIVES if segs[0] else False
        if coll:
            args = [[env[id(v)] for v in seg[0][1].inputs] for seg, env in zip(segs, envs)]
            node = segs[0][0][2]
            g = node.attrs["group_size"]
            results = [out for b in range(0, self.world, g) for out in SIMULATE[node.op](args[b:b + g], node.attrs)]
            self.moved[node.op] += args[0][0].numel() * args[0][0].element_size()
        for r, (it, seg, env) in enumerate(zip(self.ranks, segs, envs)):
            for i, step, _node in seg:
                a = [env[id(v)] for v in step.inputs]
                run = (lambda s, _a, _sym, out=results[r]: out) if coll else it.run_step
                outs = _checked(run, step, a, syms[r])
                for v, t in zip(step.outputs, outs):
                    env[id(v)] = t
                if records[r] is not None:
                    records[r].update((v.name, t) for v, t in zip(step.outputs, outs))
                for key in it._free_after[i]:
                    env.pop(key, None)
