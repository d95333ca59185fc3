"""The pattern language: declare the subgraph to match (what to build instead is a
`Rewrite`, applied by the driver in rewriter.py). Passes and the backends' fused
regions use this one matcher.

    X, R, W = Var("x"), Var("r"), Var("w", kind="param")
    pattern = P("norm.rms", P("add", X, R, name="sum", single_use=False), W, eps=ANY)
    m = match(pattern, value, graph)           # None, or m["x"], m["sum"], m.attr("eps"), m.nodes

Pieces (tinygrad `PatternMatcher`, fx `replace_pattern_with_filters`, TVM DPL):
  * `P(op, *inputs, name=, out=, single_use=, rest=, **attrs)` matches a value produced by
    output `out` of a node whose op is `op` (or one of a tuple of ops). Attribute
    constraints are equal values or predicates (`eps=ANY`, `dim=lambda d: d in (-1, 3)`).
    `add`, `mul`, `maximum`, `minimum` match commutatively. `rest="ws"` binds extra
    variadic inputs as a tuple. A `name` binds the value and its node; the same name
    twice must be the same node (several outputs of one node: `P(.., out=1, name="n")`).
  * Single use is a constraint of the pattern: an interior node (anything but a root)
    must have every output read only inside the match and none a graph output, unless
    `single_use=False`. A fused region declares it instead of walking `sole_user`s.
  * `Var(name, kind=, where=)` binds any value; the same name twice must be the same Value.
  * `Roots(p0, p1, ...)` is a multi-root pattern: p0 is matched where the driver looks,
    each later root at a value reached by climbing from values already bound (every
    later root shares a name with an earlier one); the roots are distinct nodes.
  * `match(pattern, value, graph)` matches rooted at `value`; `match_region(pattern,
    node, graph, anchor)` finds the match whose sub-pattern named `anchor` is `node`
    (a backend claiming a region from its first node in graph order).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from dsgraph.ir import Graph, Node, Value

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


def _names(pat) -> set[str]:
    if isinstance(pat, Var):
        return {pat.name}
    own = {n for n in (pat.name, pat.rest) if n is not None}
    return own.union(*(_names(q) for q in pat.inputs))


class Roots:
    """Several patterns matched together, sharing their bindings (a match rooted at several nodes)."""

    def __init__(self, first: P, *more: P):
        seen = _names(first)
        for p in more:
            if not _names(p) & seen:
                raise ValueError(f"Roots: {p!r} shares no name with the roots before it, so it cannot be found")
            seen |= _names(p)
        self.patterns = (first, *more)

    def __repr__(self) -> str:
        return f"Roots({', '.join(map(repr, self.patterns))})"


@dataclass
class Match:
    """A successful match: bound values by name, matched nodes, and the root (the first root of a Roots)."""

    root: Node
    root_value: Value
    values: dict[str, Any]
    nodes: list[Node]
    named_nodes: dict[str, Node] = field(default_factory=dict)
    roots: tuple[Value, ...] = ()

    def __getitem__(self, name: str):
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def node(self, name: str | None = None) -> Node:
        return self.root if name is None else self.named_nodes[name]

    def attr(self, key: str, node: str | None = None):
        return self.node(node).attrs[key]


class _State:
    __slots__ = ("values", "nodes", "named")

    def __init__(self, values, nodes, named):
        self.values, self.nodes, self.named = values, nodes, named

    def bind(self, name: str, value) -> "_State":
        return _State({**self.values, name: value}, self.nodes, self.named)


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
        if pat.name in st.values:  # a name seen before: the same node (its inputs were matched then)
            if st.named.get(pat.name) is node:
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
    st = _State(st.values, st.nodes + ((node, pat),), st.named)
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


def _paths(pat: P, is_target: Callable[[Any], bool]) -> list[tuple[Any, tuple[P, ...]]]:
    """(sub-pattern, the P's from `pat` down to its parent) for every sub-pattern `is_target` accepts, shortest
    path first."""
    found: list[tuple[Any, tuple[P, ...]]] = []

    def walk(p: P, above: tuple[P, ...]) -> None:
        for q in p.inputs:
            if is_target(q):
                found.append((q, above + (p,)))
            if isinstance(q, P):
                walk(q, above + (p,))

    walk(pat, ())
    return sorted(found, key=lambda t: len(t[1]))


def _climb(start: Value, above: tuple[P, ...]) -> list[Value]:
    """The values the root of `above` (root first) could match, given that its last P reads `start`."""
    frontier = [start]
    for p in reversed(above):
        seen: dict[int, Value] = {}
        for v in frontier:
            for u in v.users:
                if u.op in p.ops and p.out < len(u.outputs):
                    seen.setdefault(id(u), u.outputs[p.out])
        frontier = list(seen.values())
    return frontier


def _candidates(pat: P, st: _State) -> list[Value]:
    """Where a later root of a Roots may stand: climbed from the nearest value the match has bound."""
    bound = lambda q: getattr(q, "name", None) in st.values and isinstance(st.values[q.name], Value)  # noqa: E731
    hits = _paths(pat, bound)
    if not hits:
        return []
    q, above = hits[0]
    return _climb(st.named[q.name].outputs[q.out] if isinstance(q, P) else st.values[q.name], above)


def _match_roots(pats: tuple[P, ...], st: _State, roots: tuple[Value, ...]) -> Iterator[tuple[_State, tuple]]:
    if not pats:
        yield st, roots
        return
    for v in _candidates(pats[0], st):
        if any(v.node is r.node for r in roots):
            continue
        for st1 in _match(pats[0], v, st):
            yield from _match_roots(pats[1:], st1, roots + (v,))


def _single_use_ok(graph: Graph, st: _State, roots: set[int]) -> bool:
    inside = {id(n) for n, _ in st.nodes}
    outs = {id(v) for v in graph.outputs.values()}
    for node, pat in st.nodes:
        if id(node) in roots or not pat.single_use:
            continue
        for v in node.outputs:
            if id(v) in outs or any(id(u) not in inside for u in v.users):
                return False
    return True


def matches(pattern: P | Roots, value: Value, graph: Graph) -> Iterator[Match]:
    """Every way `pattern` matches rooted at `value` (its first root, for a Roots), in search order."""
    first, more = (pattern.patterns[0], pattern.patterns[1:]) if isinstance(pattern, Roots) else (pattern, ())
    for st0 in _match(first, value, _State({}, (), {})):
        for st, roots in _match_roots(more, st0, (value,)):
            if _single_use_ok(graph, st, {id(r.node) for r in roots}):
                nodes = list(dict.fromkeys(n for n, _ in st.nodes))
                yield Match(value.node, value, dict(st.values), nodes, dict(st.named), roots)


def match(pattern: P | Roots, value: Value, graph: Graph) -> Match | None:
    """The first way `pattern` matches at `value` (rooted there), or None."""
    return next(matches(pattern, value, graph), None)


def match_region(pattern: P | Roots, node: Node, graph: Graph, anchor: str) -> Match | None:
    """The match of `pattern` whose sub-pattern named `anchor` (in its first root) is `node`, or None. The root
    is found by climbing from `node` through the pattern's path to the anchor."""
    first = pattern.patterns[0] if isinstance(pattern, Roots) else pattern
    if first.name == anchor:
        target, above = first, ()
    else:
        hits = _paths(first, lambda q: isinstance(q, P) and q.name == anchor)
        if not hits:
            raise ValueError(f"match_region: {pattern!r} has no sub-pattern named {anchor!r}")
        target, above = hits[0]
    if node.op not in target.ops or target.out >= len(node.outputs):
        return None
    for v in _climb(node.outputs[target.out], above) if above else [node.outputs[target.out]]:
        m = next((m for m in matches(pattern, v, graph) if m.named_nodes.get(anchor) is node), None)
        if m is not None:
            return m
    return None
