"""The pattern language: declare the subgraph to match and a function that builds
its replacement; one driver applies a table of rewrites to a fixpoint.

    X, R, W = Var("x"), Var("r"), Var("w", kind="param")
    add_rms = Rewrite("add+rms",
                      P("norm.rms", P("add", X, R, name="sum", single_use=False), W, eps=ANY),
                      lambda b, m: dict(zip((m.root_value, m["sum"]),
                                            b.norm.add_rms(m["x"], m["r"], m["w"], eps=m.attr("eps")))))
    stats = apply_rewrites(graph, [add_rms])

Pieces (tinygrad `PatternMatcher`, fx `replace_pattern_with_filters`, TVM DPL):
  * `P(op, *inputs, name=, out=, single_use=, rest=, **attrs)` matches a value produced by
    output `out` of a node whose op is `op` (or one of a tuple of ops). Attribute
    constraints are equal values or predicates (`eps=ANY`, `dim=lambda d: d in (-1, 3)`).
    `add`, `mul`, `maximum`, `minimum` match commutatively. `rest="ws"` binds extra
    variadic inputs as a tuple. Interior nodes must be single-use (every output used
    only inside the match) unless `single_use=False`.
  * `Var(name, kind=, where=)` binds any value; the same name twice must be the same Value.
  * A replacement function `(b, match) -> {old value: new value}` (or None to decline) builds
    with `b`, a RewriteBuilder inserting before the root; the engine rewires every use of
    each old value, stamps new nodes with `meta["origin"]` (the root they came from) and
    `meta["replaces"]` ({output index: old value name}), erases what became dead,
    restores topological order if rewiring needs it, and verifies the graph at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from dsgraph.errors import PassError
from dsgraph.ir import Graph, Node, Value

from .rewriter import RewriteBuilder, erase_dead, mark_replaces, restore_topological_order

COMMUTATIVE = frozenset({"add", "mul", "maximum", "minimum"})


def ANY(_value) -> bool:  # noqa: N802  (reads as a constant in patterns: eps=ANY)
    """Attribute constraint that accepts any value (the attribute is still read through match.attr)."""
    return True


class Var:
    """Matches any value; binds it under `name` (same name twice -> same Value)."""

    def __init__(self, name: str, kind: str | None = None, where: Callable[[Value], bool] | None = None):
        self.name, self.kind, self.where = name, kind, where

    def __repr__(self) -> str:
        return f"${self.name}"


class P:
    """Matches a value defined by a node of op `op` whose inputs match `inputs`."""

    def __init__(self, op: str | tuple[str, ...], *inputs: "P | Var", name: str | None = None, out: int = 0,
                 single_use: bool = True, rest: str | None = None, **attrs: Any):
        self.ops = (op,) if isinstance(op, str) else tuple(op)
        self.inputs, self.name, self.out = inputs, name, out
        self.single_use, self.rest, self.attrs = single_use, rest, attrs

    def __repr__(self) -> str:
        return f"{'|'.join(self.ops)}({', '.join(map(repr, self.inputs))})"


@dataclass
class Match:
    """A successful match: bound values by name, matched nodes, and the root."""

    root: Node
    root_value: Value
    values: dict[str, Any]
    nodes: list[Node]
    named_nodes: dict[str, Node] = field(default_factory=dict)

    def __getitem__(self, name: str):
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def node(self, name: str | None = None) -> Node:
        return self.root if name is None else self.named_nodes[name]

    def attr(self, key: str, node: str | None = None):
        return self.node(node).attrs[key]


class _State:
    __slots__ = ("values", "nodes", "named", "pats")

    def __init__(self, values, nodes, named, pats):
        self.values, self.nodes, self.named, self.pats = values, nodes, named, pats

    def bind(self, name: str, value) -> "_State":
        return _State({**self.values, name: value}, self.nodes, self.named, self.pats)


def _attrs_ok(pat: P, node: Node) -> bool:
    for key, want in pat.attrs.items():
        if key not in node.attrs:
            return False
        have = node.attrs[key]
        if callable(want):
            if not want(have):
                return False
        elif have != want:
            return False
    return True


def _match(pat, value: Value, st: _State) -> Iterator[_State]:
    if isinstance(pat, Var):
        if (pat.kind is not None and value.kind != pat.kind) or (pat.where is not None and not pat.where(value)):
            return
        if pat.name not in st.values:
            yield st.bind(pat.name, value)
        elif st.values[pat.name] is value:
            yield st
        return
    node = value.node
    if node is None or node.op not in pat.ops or value.index != pat.out or not _attrs_ok(pat, node):
        return
    if pat.name is not None:
        if pat.name in st.values:
            if st.values[pat.name] is value:
                yield st
            return
        st = st.bind(pat.name, value)
        st.named = {**st.named, pat.name: node}
    n = len(pat.inputs)
    if len(node.inputs) < n or (pat.rest is None and len(node.inputs) != n):
        return
    orders = [node.inputs[:n]]
    if node.op in COMMUTATIVE and n == 2 and node.inputs[0] is not node.inputs[1]:
        orders.append(node.inputs[1::-1])
    st = _State(st.values, st.nodes + ((node, pat),), st.named, st.pats)
    if pat.rest is not None:
        st = st.bind(pat.rest, tuple(node.inputs[n:]))
    for order in orders:
        yield from _match_seq(pat.inputs, order, st)


def _match_seq(pats, values, st: _State) -> Iterator[_State]:
    if not pats:
        yield st
        return
    for st1 in _match(pats[0], values[0], st):
        yield from _match_seq(pats[1:], values[1:], st1)


def _single_use_ok(graph: Graph, st: _State, root: Node) -> bool:
    inside = {id(n) for n, _ in st.nodes}
    outs = {id(v) for v in graph.outputs.values()}
    for node, pat in st.nodes:
        if node is root or not pat.single_use:
            continue
        for v in node.outputs:
            if id(v) in outs or any(id(u) not in inside for u in v.users):
                return False
    return True


def match(pattern: P, value: Value, graph: Graph) -> Match | None:
    """The first way `pattern` matches at `value` (rooted there), or None."""
    for st in _match(pattern, value, _State({}, (), {}, ())):
        if _single_use_ok(graph, st, value.node):
            nodes = list(dict.fromkeys(n for n, _ in st.nodes))
            return Match(value.node, value, dict(st.values), nodes, dict(st.named))
    return None


Builder = Callable[[RewriteBuilder, Match], "dict[Value, Value] | None"]


@dataclass
class Rewrite:
    """A named (pattern, replacement) pair; `build(b, m)` returns {old value: new value} or None to decline."""

    name: str
    pattern: P
    build: Builder


def _dtype_of(node: Node) -> str:
    floats = [v.type.dtype for v in node.outputs + node.inputs if v.type.is_float]
    return floats[0] if floats else "float32"


def apply_once(graph: Graph, rw: Rewrite, m: Match) -> bool:
    """Build the replacement for one match and rewire; False if the builder declined. Rewiring may put a use
    before its definition: the caller restores topological order (apply_rewrites does, once per round, since a
    re-sort walks the whole graph)."""
    b = RewriteBuilder(graph, origin=m.root_value.name, dtype=_dtype_of(m.root))
    with graph.inserting_before(m.root):
        try:
            repl = rw.build(b, m)
        except Exception:
            b.rollback()
            raise
    if repl is None:
        b.rollback()
        return False
    for old, new in repl.items():
        if new.node is not None and new.node in b.created:
            mark_replaces(new, old)
        graph.replace_all_uses(old, new)
    touched = set(m.nodes) | set(b.created) | {old.node for old in repl if old.node is not None}
    erase_dead(graph, [n for n in graph.nodes if n in touched])
    return True


def apply_rewrites(graph: Graph, rewrites: list[Rewrite], max_rounds: int = 50, verify: bool = True) -> dict:
    """Apply rewrites in topological order until none matches; returns {"matched", "rewritten", per-rule}."""
    stats: dict[str, int] = {"matched": 0, "rewritten": 0}
    for _ in range(max_rounds):
        changed = False
        alive = set(graph.nodes)
        for node in list(graph.nodes):
            if node not in alive:  # erased by an earlier rewrite this round
                continue
            for rw in rewrites:
                m = next((mm for v in node.outputs if (mm := match(rw.pattern, v, graph)) is not None), None)
                if m is None:
                    continue
                stats["matched"] += 1
                if apply_once(graph, rw, m):
                    stats["rewritten"] += 1
                    stats[rw.name] = stats.get(rw.name, 0) + 1
                    changed = True
                    alive = set(graph.nodes)
                    break
        if not changed:
            break
        restore_topological_order(graph)
    else:
        raise PassError(f"rewrites {[r.name for r in rewrites]} did not reach a fixpoint in {max_rounds} rounds")
    if verify and stats["rewritten"]:
        graph.verify()
    return stats
