"""Editing helpers shared by passes: a GraphBuilder over an existing graph, dead-node
removal around a rewrite, and restoring topological order after rewiring.

`RewriteBuilder` is how replacements (and decompositions) are built: it adds nodes
to the graph being rewritten (at `graph.inserting_before(...)` positions), stamps
each with `meta["origin"]` (the root value it was built for; `mark_replaces` adds the
exact {output: replaced value} map the proof harness uses to name the first
diverging node) and remembers what it created so a declined
rewrite can be rolled back.
"""
from __future__ import annotations

from dsgraph.builder import GraphBuilder
from dsgraph.ir import Graph, Node, Value


class RewriteBuilder(GraphBuilder):
    """`b.<op>(...)` on an existing graph; new names are `<prefix>.<op>` to keep provenance readable."""

    def __init__(self, graph: Graph, origin: str | None = None, dtype: str = "float32"):
        self.graph = graph
        self.dtype = dtype
        self._scope = [origin] if origin else []
        self.origin = origin
        self.created: list[Node] = []

    def op(self, op: str, *inputs: Value, name: str | None = None, **attrs):
        hint = ".".join(self._scope + [name or op.split(".")[-1]])
        node = self.graph.add_node(op, inputs, attrs, names=hint,
                                   meta={"origin": self.origin} if self.origin else None)
        self.created.append(node)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def rollback(self) -> None:
        """Erase every node this builder created (a replacement function declined after building)."""
        for node in reversed(self.created):
            for v in node.outputs:
                for user in list(v.users):
                    if user not in self.created:
                        raise AssertionError(f"rollback: %{v.name} already used by {user.op}")
            self.graph.erase_node(node)
        self.created.clear()


def mark_replaces(new: Value, old: Value) -> None:
    """Record on new's node that output `new.index` stands for `old` (the proof harness compares them)."""
    new.node.meta.setdefault("replaces", {})[str(new.index)] = old.name


def is_dead(graph: Graph, node: Node) -> bool:
    outs = set(map(id, graph.outputs.values()))
    return all(not v.users and id(v) not in outs for v in node.outputs)


def erase_dead(graph: Graph, nodes) -> int:
    """Erase those of `nodes` (and, transitively, their producers among them) that nothing uses."""
    pending = [n for n in nodes]
    removed = 0
    progress = True
    while progress:
        progress = False
        for node in list(reversed(pending)):
            if node in pending and is_dead(graph, node):
                graph.erase_node(node)
                pending.remove(node)
                removed += 1
                progress = True
    return removed


def restore_topological_order(graph: Graph) -> bool:
    """Stable topological re-sort if rewiring put a use before its definition; returns whether it moved nodes.

    Rewrites insert before the matched root; when a replaced interior value has
    users between the interior node and the root, those users now read a value
    defined later. Re-sorting (keeping the original order wherever possible) fixes it.
    """
    pos = {id(n): i for i, n in enumerate(graph.nodes)}
    if all(v.node is None or pos[id(v.node)] < i for i, n in enumerate(graph.nodes) for v in n.inputs):
        return False
    order: list[Node] = []
    placed: set[int] = set()
    for root in list(graph.nodes):
        stack = [(root, False)]
        while stack:
            node, ready = stack.pop()
            if id(node) in placed:
                continue
            if ready:
                placed.add(id(node))
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((v.node, False) for v in reversed(node.inputs)
                         if v.node is not None and id(v.node) not in placed)
    graph.nodes[:] = order
    return True
