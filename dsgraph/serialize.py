"""JSON round-trip of graphs (weights travel separately, as safetensors).

Round-trips are exact: names, types, attributes (tuples stay tuples, floats keep
every bit through Python's repr) and node order.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import VerifyError
from .ir import Graph, Node, Value
from .types import TensorType

FORMAT_VERSION = 1


def _attr_to_json(v: Any) -> Any:
    if isinstance(v, tuple):
        return {"tuple": [_attr_to_json(x) for x in v]}
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return {"float": repr(v)}
    return v


def _attr_from_json(v: Any) -> Any:
    if isinstance(v, dict) and "tuple" in v:
        return tuple(_attr_from_json(x) for x in v["tuple"])
    if isinstance(v, dict) and "float" in v:
        return float(v["float"])
    return v


def graph_to_json(graph) -> dict:
    return {
        "format": "dsgraph.graph",
        "version": FORMAT_VERSION,
        "name": graph.name,
        "inputs": [{"name": v.name, "kind": v.kind, "type": v.type.to_json()} for v in graph.inputs.values()],
        "nodes": [{"op": n.op,
                   "inputs": [v.name for v in n.inputs],
                   "attrs": {k: _attr_to_json(a) for k, a in n.attrs.items()},
                   "outputs": [{"name": v.name, "type": v.type.to_json()} for v in n.outputs],
                   **({"meta": n.meta} if n.meta else {})}
                  for n in graph.nodes],
        "outputs": {k: v.name for k, v in graph.outputs.items()},
        "cache_map": dict(graph.cache_map),
        "meta": graph.meta,
    }


def graph_from_json(obj: dict):
    if obj.get("format") != "dsgraph.graph":
        raise VerifyError("not a dsgraph graph JSON (missing format: dsgraph.graph)")
    if obj.get("version", 0) > FORMAT_VERSION:
        raise VerifyError(f"graph JSON version {obj['version']} is newer than this dsgraph "
                          f"({FORMAT_VERSION}); upgrade dsgraph")
    g = Graph(obj["name"])
    env: dict[str, Value] = {}
    for inp in obj["inputs"]:
        env[inp["name"]] = g.add_input(inp["name"], TensorType.from_json(inp["type"]), inp["kind"])
    for nd in obj["nodes"]:
        try:
            inputs = tuple(env[n] for n in nd["inputs"])
        except KeyError as e:
            raise VerifyError(f"{nd['op']}: input %{e.args[0]} is not defined before use") from None
        node = Node(nd["op"], inputs, {k: _attr_from_json(a) for k, a in nd["attrs"].items()})
        node.meta.update(nd.get("meta", {}))
        outs = []
        for i, o in enumerate(nd["outputs"]):
            v = Value(o["name"], TensorType.from_json(o["type"]), node, i)
            env[o["name"]] = v
            g._names.add(o["name"])
            outs.append(v)
        node.outputs = tuple(outs)
        for v in inputs:
            v.users[node] = None
        g.nodes.append(node)
    for k, name in obj["outputs"].items():
        g.set_output(k, env[name])
    g.cache_map = dict(obj.get("cache_map", {}))
    g.meta = obj.get("meta", {})
    return g


def save_graph(graph, path: str | Path) -> None:
    Path(path).write_text(json.dumps(graph_to_json(graph), indent=1))


def load_graph(path: str | Path):
    g = graph_from_json(json.loads(Path(path).read_text()))
    g.verify()
    return g
