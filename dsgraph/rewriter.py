"""Rewriting: a table of `Rewrite(name, pattern, build)` applied to a fixpoint by one
worklist driver (`apply_rewrites`), and the editing helpers under it — a GraphBuilder
over an existing graph, dead-node removal around a rewrite, and restoring topological
order after rewiring.

    add_rms = Rewrite("add+rms",
                      P("norm.rms", P("add", X, R, name="sum", single_use=False), W, eps=ANY),
                      lambda b, m: dict(zip((m.root_value, m["sum"]),
                                            b.norm.add_rms(m["x"], m["r"], m["w"], eps=m.attr("eps")))))
    stats = apply_rewrites(graph, [add_rms])

A replacement function `(b, match) -> {old value: new value}` (or None to decline) builds
with `b`, a RewriteBuilder inserting before the root; the engine rewires every use of
each old value, stamps new nodes with `meta["origin"]` (the root they came from) and
`meta["replaces"]` ({output index: old value name}), erases what became dead,
restores topological order if rewiring needs it, and verifies the graph at the end.

`RewriteBuilder` is how replacements (and decompositions) are built: it adds nodes
to the graph being rewritten (at `graph.inserting_before(...)` positions), stamps
each with `meta["origin"]` (the root value it was built for; `mark_replaces` adds the
exact {output: replaced value} map the proof harness uses to name the first
diverging node) and remembers what it did so a declined rewrite can be rolled back:
the nodes it created and its edits of the graph's interface, made through its verbs
for inputs (`param`, `input`, `cache_input`), outputs (`output`, `remove_output`) and
caches (`output(..., cache_of=)`, `retire_cache`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dsgraph.builder import GraphBuilder
from dsgraph.errors import PassError
from dsgraph.ir import Graph, Node, Value
from dsgraph.pattern import Match, P, Roots, match
from dsgraph.types import TensorType

_MISSING = object()


class RewriteBuilder(GraphBuilder):
    """`b.<op>(...)` on an existing graph; new names are `<prefix>.<op>` to keep provenance readable."""

    def __init__(self, graph: Graph, origin: str | None = None, dtype: str = "float32"):
        self.graph = graph
        self.dtype = dtype
        self._scope = [origin] if origin else []
        self.origin = origin
        self.created: list[Node] = []
        self._inputs: list[str] = []
        self._undo: list[Callable[[], None]] = []

    def op(self, op: str, *inputs: Value, name: str | None = None, **attrs):
        hint = ".".join(self._scope + [name or op.split(".")[-1]])
        node = self.graph.add_node(op, inputs, attrs, names=hint,
                                   meta={"origin": self.origin} if self.origin else None)
        self.created.append(node)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    # the graph's interface -------------------------------------------------------------------
    def add_input(self, name: str, type: TensorType, kind: str) -> Value:
        v = self.graph.add_input(name, type, kind)
        self._inputs.append(name)
        return v

    def output(self, name: str, value: Value, cache_of: Value | None = None) -> None:
        """Set graph output `name` (and, with `cache_of`, make it that cache input's next state)."""
        self._keep(self.graph.outputs, name)
        if cache_of is not None:
            self._keep(self.graph.cache_map, cache_of.name)
        super().output(name, value, cache_of)

    def remove_output(self, name: str) -> None:
        self._keep(self.graph.outputs, name)
        del self.graph.outputs[name]

    def retire_cache(self, cache: Value) -> None:
        """Take cache input `cache` out of the graph's state: its next-state output and its cache_map pair go;
        the input itself goes once nothing reads it (`graph.remove_unused_inputs(("cache",))`)."""
        out = self.graph.cache_map.get(cache.name)
        self._keep(self.graph.cache_map, cache.name)
        if out is not None:
            self.remove_output(out)
        self.graph.cache_map.pop(cache.name, None)

    def _keep(self, table: dict, key: str) -> None:
        """Remember table[key] (or its absence) so rollback can restore it."""
        old = table.get(key, _MISSING)
        self._undo.append(lambda: table.pop(key, None) if old is _MISSING else table.__setitem__(key, old))

    def rollback(self) -> None:
        """Undo everything this builder did (a replacement function declined after building): interface edits,
        then the nodes it created, then the inputs it added."""
        for undo in reversed(self._undo):
            undo()
        for node in reversed(self.created):
            for v in node.outputs:
                for user in list(v.users):
                    if user not in self.created:
                        raise AssertionError(f"rollback: %{v.name} already used by {user.op}")
            self.graph.erase_node(node)
        for name in reversed(self._inputs):
            self.graph.remove_input(name)
        self.created.clear()
        self._inputs.clear()
        self._undo.clear()


def mark_replaces(new: Value, old: Value) -> None:
    """Record on new's node that output `new.index` stands for `old` (the proof harness compares them)."""
    new.node.meta.setdefault("replaces", {})[str(new.index)] = old.name


def is_dead(graph: Graph, node: Node) -> bool:
    outs = set(map(id, graph.outputs.values()))
    return all(not v.users and id(v) not in outs for v in node.outputs)


def erase_dead(graph: Graph, nodes) -> list[Node]:
    """Erase those of `nodes` (and, transitively, their producers among them) that nothing uses; returns them."""
    pending = list(nodes)
    removed: list[Node] = []
    progress = True
    while progress:
        progress = False
        for node in list(reversed(pending)):
            if node in pending and is_dead(graph, node):
                graph.erase_node(node)
                pending.remove(node)
                removed.append(node)
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


Builder = Callable[[RewriteBuilder, Match], "dict[Value, Value] | None"]


@dataclass
class Rewrite:
    """A named (pattern, replacement) pair; `build(b, m)` returns {old value: new value} or None to decline."""

    name: str
    pattern: P | Roots
    build: Builder


def _dtype_of(node: Node) -> str:
    floats = [v.type.dtype for v in node.outputs + node.inputs if v.type.is_float]
    return floats[0] if floats else "float32"


def apply_once(graph: Graph, rw: Rewrite, m: Match) -> tuple[list[Node], list[Node]] | None:
    """Build the replacement for one match and rewire; None if the builder declined, else (the nodes erased, the
    nodes the rewrite changed: created, rewired users, producers of what lost a user — where a new match can
    start). Rewiring may put a use before its definition: the caller restores topological order (apply_rewrites
    does, once per sweep, since a re-sort walks the whole graph)."""
    b = RewriteBuilder(graph, origin=m.root_value.name, dtype=_dtype_of(m.root))
    with graph.inserting_before(m.root):
        try:
            repl = rw.build(b, m)
        except Exception:
            b.rollback()
            raise
    if repl is None:
        b.rollback()
        return None
    rewired = [u for old in repl for u in old.users]
    for old, new in repl.items():
        if new.node is not None and new.node in b.created:
            mark_replaces(new, old)
        graph.replace_all_uses(old, new)
    touched = set(m.nodes) | set(b.created) | {old.node for old in repl if old.node is not None}
    erased = erase_dead(graph, touched)
    gone = set(erased)
    near = [n for n in b.created + rewired if n not in gone]
    near += [v.node for n in erased + near for v in n.inputs if v.node is not None]
    return erased, [n for n in dict.fromkeys(near) if n not in gone]


def _depth(pat) -> int:
    if isinstance(pat, Roots):
        return sum(map(_depth, pat.patterns))  # root to root runs down one pattern and up another
    return 1 + max(map(_depth, pat.inputs), default=0) if isinstance(pat, P) else 0


def _around(nodes: list[Node], radius: int, across: bool) -> set[Node]:
    """`nodes` and the nodes within `radius` steps up the use lists: the roots a match over a changed node can
    have. With `across` (a Roots in the table: from one root down to a shared value and up to another) steps go
    down to producers, and across a graph input to its other readers, too."""
    seen, frontier = set(nodes), list(nodes)
    for _ in range(radius):
        step = [u for n in frontier for v in n.outputs for u in v.users]
        if across:
            step += [m for n in frontier for v in n.inputs for m in ((v.node,) if v.node is not None else v.users)]
        frontier = [m for m in dict.fromkeys(step) if m not in seen]
        seen.update(frontier)
    return seen


def apply_rewrites(graph: Graph, rewrites: list[Rewrite], max_rounds: int = 50, verify: bool = True) -> dict:
    """Apply rewrites until none matches; returns {"matched", "rewritten", per-rule}.

    A worklist driver (xDSL's worklist, tinygrad's `graph_rewrite`): the first sweep visits every node in
    topological order, trying the rewrites in table order at each; later sweeps visit only the nodes within the
    patterns' depth of an earlier rewrite, the only places a new match can appear. A sweep that still rewrites
    after `max_rounds` means the table rebuilds its own patterns: PassError."""
    stats: dict[str, int] = {"matched": 0, "rewritten": 0}
    radius = max(map(_depth, (rw.pattern for rw in rewrites)), default=0)
    across = any(isinstance(rw.pattern, Roots) for rw in rewrites)
    pending = set(graph.nodes)
    for _ in range(max_rounds):
        if not pending:
            break
        visit, pending = pending, set()
        for node in list(graph.nodes):
            if node not in visit:
                continue
            for rw in rewrites:
                m = next((mm for v in node.outputs if (mm := match(rw.pattern, v, graph)) is not None), None)
                if m is None:
                    continue
                stats["matched"] += 1
                done = apply_once(graph, rw, m)
                if done is None:
                    continue
                stats["rewritten"] += 1
                stats[rw.name] = stats.get(rw.name, 0) + 1
                erased, near = done
                visit.difference_update(erased)
                pending.difference_update(erased)
                pending |= _around(near, radius, across)
                break
        restore_topological_order(graph)
    else:
        if pending:
            raise PassError(f"rewrites {[r.name for r in rewrites]} did not reach a fixpoint in {max_rounds} rounds")
    if verify and stats["rewritten"]:
        graph.verify()
    return stats
