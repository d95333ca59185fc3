"""Legalization: lower the domain ops a backend has no kernel for into primitives,
through each op's registered `.decomposition` (dsgraph/ops/*, inserted by
dsgraph.decompose.decompose_node, which stamps meta["origin"] for the harness)."""
from __future__ import annotations

from dataclasses import dataclass, field

from dsgraph.decompose import decompose_node
from dsgraph.errors import PassError, VerifyError
from dsgraph.ir import Graph, Node
from dsgraph.ops.registry import get_op
from dsgraph.rewriter import mark_replaces
from dsgraph.weights import WeightStore

from .base import Pass, register

MAX_DEPTH = 16  # decompositions may emit other domain ops (add_rms -> rms); bounded to catch cycles


@register
@dataclass
class Legalize(Pass):
    """Replace every domain-level node whose op is not in `keep` by its decomposition, repeatedly (a
    decomposition may itself use domain ops), until only primitives and kept ops remain.

    An op outside `keep` without a decomposition is an error naming the op and both fixes (write a
    decomposition in dsgraph/ops, or keep the op because the backend has a kernel for it) — never
    a silent fallback.
    """

    name = "legalize"
    description = "lower domain ops not in `keep` to primitives via their decompositions"
    keep: frozenset = field(default_factory=frozenset)

    def __post_init__(self):
        self.keep = frozenset(self.keep)

    def _todo(self, graph: Graph) -> list[Node]:
        return [n for n in graph.nodes if get_op(n.op).level == "domain" and n.op not in self.keep]

    def check_preconditions(self, graph: Graph) -> None:
        missing = sorted({n.op for n in self._todo(graph) if get_op(n.op).decompose_fn is None})
        if missing:
            raise PassError(f"legalize: no decomposition into primitives for {', '.join(missing)}; add one "
                            f"with @OP.decomposition in dsgraph/ops, or keep the op(s) for a backend that has "
                            f"kernels: passes.get('legalize', keep={{{', '.join(map(repr, missing))}}})")

    def run(self, graph: Graph, weights: WeightStore) -> dict:
        lowered: dict[str, int] = {}
        for _ in range(MAX_DEPTH):
            todo = self._todo(graph)
            if not todo:
                break
            self.check_preconditions(graph)  # decompositions may have introduced new domain ops
            for node in todo:
                self._lower(graph, node)
                lowered[node.op] = lowered.get(node.op, 0) + 1
        else:
            raise PassError(f"legalize: still domain ops after {MAX_DEPTH} rounds "
                            f"({sorted({n.op for n in self._todo(graph)})}); a decomposition cycle?")
        return {"rewritten": sum(lowered.values()), **{f"lowered:{k}": v for k, v in sorted(lowered.items())}}

    @staticmethod
    def _lower(graph: Graph, node: Node) -> None:
        try:
            new = decompose_node(graph, node)
        except VerifyError as e:
            raise PassError(f"legalize: {e}") from None
        for old, v in zip(node.outputs, new):
            if v.node is not None and v.node.meta.get("origin") == node.outputs[0].name:
                mark_replaces(v, old)
            graph.replace_all_uses(old, v)
        graph.erase_node(node)
