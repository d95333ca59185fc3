"""Graph invariants: SSA, topological order, registered ops, attrs and types.

Every failure names the offending node, so a pass that breaks the IR is caught
where it went wrong.
"""
from __future__ import annotations

from .errors import DSGraphError, VerifyError
from .ops.registry import get_op


def _where(i: int, node) -> str:
    return f"node {i} ({node.format(max_inputs=6)})"


def verify(graph) -> None:
    defined: dict[int, object] = {}
    names: set[str] = set()

    def define(v, where) -> None:  # where() names the definition, formatted only for an error
        if id(v) in defined:
            raise VerifyError(f"{where()}: value %{v.name} is defined twice (SSA)")
        if v.name in names:
            raise VerifyError(f"{where()}: name %{v.name} is used by two values")
        defined[id(v)] = v
        names.add(v.name)

    for name, v in graph.inputs.items():
        if v.name != name or v.node is not None:
            raise VerifyError(f"graph input {name!r} is inconsistent (value %{v.name})")
        define(v, lambda: f"input %{name}")
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            if id(v) not in defined:
                raise VerifyError(f"{_where(i, node)}: input %{v.name} is used before it is defined "
                                  "(not in topological order, or from another graph)")
            if node not in v.users:
                raise VerifyError(f"{_where(i, node)}: use-def list of %{v.name} misses this node")
        try:
            opdef = get_op(node.op)
            opdef.check_arity(len(node.inputs))
            attrs = opdef.normalize_attrs(node.attrs)
            types = opdef.infer_types([v.type for v in node.inputs], attrs)
        except DSGraphError as e:
            raise VerifyError(f"{_where(i, node)}: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as e:
            # attributes of a type or value the op's rule cannot take (a loaded graph file, a buggy pass)
            raise VerifyError(f"{_where(i, node)}: attributes or input types the op cannot take "
                              f"({type(e).__name__}: {e})") from None
        if attrs != node.attrs:
            raise VerifyError(f"{_where(i, node)}: attributes are not normalised ({node.attrs} vs {attrs})")
        if len(types) != len(node.outputs):
            raise VerifyError(f"{_where(i, node)}: has {len(node.outputs)} outputs, op declares {len(types)}")
        for j, (v, t) in enumerate(zip(node.outputs, types)):
            if v.node is not node or v.index != j:
                raise VerifyError(f"{_where(i, node)}: output %{v.name} does not point back at its node")
            if v.type != t:
                raise VerifyError(f"{_where(i, node)}: output %{v.name} has type {v.type}, rule gives {t}")
            define(v, lambda: _where(i, node))
    for v in list(defined.values()):
        for user in v.users:
            if v not in user.inputs:
                raise VerifyError(f"use-def list of %{v.name} names a node that does not use it ({user.op})")
    for name, v in graph.outputs.items():
        if id(v) not in defined:
            raise VerifyError(f"graph output {name!r} refers to %{v.name}, which is not defined")
    for cin, cout in graph.cache_map.items():
        if cin not in graph.inputs or graph.inputs[cin].kind != "cache":
            raise VerifyError(f"cache_map names {cin!r}, which is not a cache input")
        if cout not in graph.outputs:
            raise VerifyError(f"cache_map pairs {cin!r} with output {cout!r}, which does not exist")
