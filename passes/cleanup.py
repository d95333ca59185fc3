"""Cleanups: dead-code and common-subexpression elimination, constant folding of
shape arithmetic and constant-only subgraphs, and pruning the MTP branch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsgraph.dtypes import dtype_name, to_torch
from dsgraph.interpreter import run_node
from dsgraph.ir import Graph, Node
from dsgraph.pattern import ANY, P, Var
from dsgraph.rewriter import Rewrite, RewriteBuilder, apply_rewrites, mark_replaces
from dsgraph.weights import WeightStore

from .base import Pass, register

X = Var("x")


@register
@dataclass
class DCE(Pass):
    """Drop nodes no graph output needs, then params nothing reads (activation and cache inputs are the
    graph's interface and stay)."""

    name = "dce"
    description = "dead-code elimination: unused nodes and params"

    def run(self, graph: Graph, weights: WeightStore) -> dict:
        nodes = graph.eliminate_dead_code()
        params = graph.remove_unused_inputs(("param",))
        return {"rewritten": nodes + len(params), "nodes_removed": nodes, "params_removed": len(params)}


def _attr_key(v):
    return (type(v).__name__, tuple(_attr_key(x) for x in v)) if isinstance(v, tuple) else (type(v).__name__, v)


@register
@dataclass
class CSE(Pass):
    """Merge nodes with the same op, the same input values and equal attributes (every op is pure)."""

    name = "cse"
    description = "common-subexpression elimination"

    def run(self, graph: Graph, weights: WeightStore) -> dict:
        seen: dict[tuple, Node] = {}
        merged = 0
        for node in list(graph.nodes):
            key = (node.op, tuple(map(id, node.inputs)), tuple((k, _attr_key(a)) for k, a in node.attrs.items()))
            first = seen.setdefault(key, node)
            if first is node:
                continue
            for old, new in zip(node.outputs, first.outputs):
                graph.replace_all_uses(old, new)
            graph.erase_node(node)
            merged += 1
        return {"rewritten": merged}


def _same_type(m) -> bool:
    return m.root_value.type == m["x"].type


def _identity(b, m):
    return {m.root_value: m["x"]} if _same_type(m) else None


IDENTITIES = [
    Rewrite("reshape_noop", P("reshape", X, shape=ANY), _identity),
    Rewrite("cast_noop", P("cast", X, dtype=ANY), _identity),
    Rewrite("expand_noop", P("expand", X, shape=ANY), _identity),
    Rewrite("permute_noop", P("permute", X, dims=lambda d: tuple(d) == tuple(range(len(d)))), _identity),
    Rewrite("concat_single", P("concat", X, dim=ANY), _identity),
    Rewrite("reshape_reshape", P("reshape", P("reshape", X, shape=ANY), shape=ANY),
            lambda b, m: {m.root_value: b.reshape(m["x"], shape=m.attr("shape"))}),
]

MAX_FOLD_ELEMENTS = 4096  # constants are stored in node attributes; bigger results stay computed


@register
@dataclass
class FoldConstants(Pass):
    """Remove no-op shape ops (reshape/cast/expand to the same type, identity permutes, reshape chains),
    evaluate shape arithmetic that static dims decide (`arange_like`, `causal_mask` over int dims) and
    nodes whose inputs are all constants, replacing them by `constant` nodes (up to MAX_FOLD_ELEMENTS)."""

    name = "fold_constants"
    description = "fold no-op shape ops, static shape arithmetic and constant-only subgraphs"

    def run(self, graph: Graph, weights: WeightStore) -> dict:
        stats = apply_rewrites(graph, IDENTITIES, verify=False)
        folded = 0
        for node in list(graph.nodes):
            if node.op == "constant" or not self._foldable(node):
                continue
            # arange_like/causal_mask read only shapes: a broadcast zero stands in without allocating
            dummies = [run_node(v.node, [], {})[v.index] if v.node is not None and v.node.op == "constant"
                       else torch.zeros((), dtype=to_torch(v.type.dtype)).expand(v.type.concrete({}))
                       for v in node.inputs]
            outs = run_node(node, dummies, {})
            if any(t.numel() > MAX_FOLD_ELEMENTS for t in outs):
                continue
            b = RewriteBuilder(graph, origin=node.outputs[0].name)
            with graph.inserting_before(node):
                new = [b.constant(value=tuple(t.flatten().tolist()), shape=tuple(t.shape), dtype=dtype_name(t.dtype),
                                  name=v.name) for v, t in zip(node.outputs, outs)]
            for old, nv in zip(node.outputs, new):
                mark_replaces(nv, old)
                graph.replace_all_uses(old, nv)
            graph.erase_node(node)
            folded += 1
        graph.eliminate_dead_code()
        rewritten = stats["rewritten"] + folded
        return {**stats, "rewritten": rewritten, "folded": folded}

    @staticmethod
    def _foldable(node: Node) -> bool:
        if not all(isinstance(d, int) for v in node.outputs for d in v.shape):
            return False
        if node.op in ("arange_like", "causal_mask"):  # depend only on (static) input shapes
            return all(isinstance(d, int) for v in node.inputs for d in v.shape)
        return bool(node.inputs) and all(v.node is not None and v.node.op == "constant" for v in node.inputs)


@register
@dataclass
class PruneMTP(Pass):
    """Drop the multi-token-prediction branch for plain decoding: outputs named `mtp_*`, the caches that
    branch updates (those whose next state depends on a `mtp_*` input; their inputs, outputs and
    cache_map pairs), then unused `mtp_*` inputs, dead nodes and params."""

    name = "prune_mtp"
    description = "remove the MTP branch (mtp_* outputs, its caches and inputs) for plain decoding"
    prefix: str = "mtp_"

    def run(self, graph: Graph, weights: WeightStore) -> dict:
        dropped = [k for k in graph.outputs if k.startswith(self.prefix)]
        if not dropped:
            return {"rewritten": 0}
        b = RewriteBuilder(graph)
        for k in dropped:
            b.remove_output(k)
        # the branch's caches are those whose next state depends on a mtp_* input (the MTP block's tokens)
        downstream = _downstream(graph, [v for n, v in graph.activations().items() if n.startswith(self.prefix)])
        caches = [cin for cin, cout in graph.cache_map.items() if id(graph.outputs[cout]) in downstream]
        for cin in caches:
            b.retire_cache(graph.inputs[cin])
        nodes = graph.eliminate_dead_code()
        for cin in caches:
            graph.remove_input(cin)
        inputs = [n for n, v in graph.activations().items() if n.startswith(self.prefix) and not v.users]
        for n in inputs:
            graph.remove_input(n)
        params = graph.remove_unused_inputs(("param",))
        return {"rewritten": len(dropped), "outputs_removed": len(dropped) + len(caches),
                "caches_removed": len(caches), "nodes_removed": nodes, "params_removed": len(params)}


def _downstream(graph: Graph, values) -> set[int]:
    """ids of every value computed from the given values (themselves included), in one forward sweep."""
    seen = {id(v) for v in values}
    for node in graph.nodes:
        if any(id(v) in seen for v in node.inputs):
            seen.update(id(v) for v in node.outputs)
    return seen
