"""Structural equality of graphs (TVM's `assert_structural_equal`): the same dataflow
from the same named inputs to the same named outputs, with value names ignored.

Two graphs are equal when their inputs agree by name, kind and type, their outputs
and cache maps have the same keys, and walking back from every output pairs each
node with one node of the other graph of the same op, attributes, output types and
(recursively) inputs — a bijection, so sharing is compared too. Node order is free.
"""
from __future__ import annotations

from dsgraph.ir import Graph


def structural_diff(g1: Graph, g2: Graph) -> str | None:
    """The first difference found, as a sentence; None if the graphs are structurally equal."""
    if sorted(g1.outputs) != sorted(g2.outputs):
        return f"outputs differ: {sorted(g1.outputs)} vs {sorted(g2.outputs)}"
    if g1.cache_map != g2.cache_map:
        return f"cache maps differ: {g1.cache_map} vs {g2.cache_map}"
    for name in sorted(set(g1.inputs) | set(g2.inputs)):
        a, b = g1.inputs.get(name), g2.inputs.get(name)
        if a is None or b is None or a.kind != b.kind or a.type != b.type:
            show = [f"{x.kind} {x.type}" if x is not None else "absent" for x in (a, b)]
            return f"input %{name}: {show[0]} vs {show[1]}"
    vmap: dict[int, object] = {}
    vback: dict[int, object] = {}
    nmap: dict[int, object] = {}
    stack = [(g1.outputs[k], g2.outputs[k], f"output {k!r}") for k in sorted(g1.outputs, reverse=True)]
    while stack:
        a, b, path = stack.pop()
        if id(a) in vmap or id(b) in vback:
            if vmap.get(id(a)) is not b:
                return f"{path}: %{a.name} and %{b.name} are shared differently"
            continue
        vmap[id(a)], vback[id(b)] = b, a
        if a.is_input or b.is_input:
            if not (a.is_input and b.is_input and a.name == b.name):
                return f"{path}: %{a.name} vs %{b.name} (an input on one side only, or different inputs)"
            continue
        na, nb = a.node, b.node
        if nmap.setdefault(id(na), nb) is not nb:
            return f"{path}: {na.format()} is paired with two different nodes"
        if a.index != b.index or a.type != b.type or na.op != nb.op or na.attrs != nb.attrs \
                or len(na.inputs) != len(nb.inputs):
            return f"{path}:\n  {na.format()}\n  {nb.format()}"
        for i in reversed(range(len(na.inputs))):
            stack.append((na.inputs[i], nb.inputs[i], f"{path} <- {na.op} input {i}"))
    if len(g1.nodes) != len(g2.nodes):
        return f"node counts differ: {len(g1.nodes)} vs {len(g2.nodes)} (dead nodes on one side?)"
    return None


def structural_equal(g1: Graph, g2: Graph) -> bool:
    return structural_diff(g1, g2) is None


def assert_structural_equal(actual: Graph, expected: Graph) -> None:
    diff = structural_diff(actual, expected)
    if diff is not None:
        raise AssertionError(f"graphs differ structurally: {diff}\n--- actual\n{actual}\n--- expected\n{expected}")
