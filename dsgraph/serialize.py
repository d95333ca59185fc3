"""JSON round-trip of graphs (weights travel separately, as safetensors).

Round-trips are exact: names, types, attributes (tuples stay tuples, floats keep
every bit through Python's repr) and node order.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import DSGraphError, VerifyError
from .ir import Graph, Node, Value
from .types import TensorType

FORMAT_VERSION = 1
_META_INTS = ("vocab_size", "max_position_embeddings")  # read by the runtime (token and length checks)


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


def graph_from_json(obj: dict, source: str = "graph JSON"):
    """The graph `obj` describes; anything malformed (missing keys, wrong types, undefined names) is a
    VerifyError naming `source` (the file) and where in it."""
    if not isinstance(obj, dict) or obj.get("format") != "dsgraph.graph":
        raise VerifyError(f"{source}: not a dsgraph graph JSON (missing format: dsgraph.graph)")
    version = obj.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise VerifyError(f"{source}: graph JSON version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise VerifyError(f"{source}: graph JSON version {version} is newer than this dsgraph "
                          f"({FORMAT_VERSION}); upgrade dsgraph")
    where = ["the graph header"]
    try:
        return _build(obj, where)
    except VerifyError as e:
        raise VerifyError(f"{source}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, DSGraphError) as e:
        raise VerifyError(f"{source}: malformed graph JSON in {where[0]} ({type(e).__name__}: {e}); the file is "
                          "damaged or was not written by dsgraph") from None


def _obj(v, what: str, kind=dict):
    if not isinstance(v, kind):
        raise VerifyError(f"{what} must be a JSON {kind.__name__}, got {type(v).__name__}")
    return v


def _build(obj: dict, where: list):
    g = Graph(_obj(obj["name"], "name", str))
    env: dict[str, Value] = {}
    for i, inp in enumerate(_obj(obj["inputs"], "inputs", list)):
        where[0] = f"input {i}"
        name = _obj(inp["name"], f"input {i} name", str)
        env[name] = g.add_input(name, TensorType.from_json(_obj(inp["type"], "type")), inp["kind"])
    for i, nd in enumerate(_obj(obj["nodes"], "nodes", list)):
        where[0] = f"node {i}"
        op = _obj(nd["op"], f"node {i} op", str)
        names = _obj(nd["inputs"], f"node {i} inputs", list)
        undefined = [n for n in names if not isinstance(n, str) or n not in env]
        if undefined:
            raise VerifyError(f"node {i} ({op}): input %{undefined[0]} is not defined before use")
        inputs = tuple(env[n] for n in names)
        node = Node(op, inputs, {k: _attr_from_json(a) for k, a in _obj(nd["attrs"], f"node {i} attrs").items()})
        node.meta.update(_obj(nd.get("meta", {}), f"node {i} meta"))
        outs = []
        for j, o in enumerate(_obj(nd["outputs"], f"node {i} outputs", list)):
            v = Value(_obj(o["name"], f"node {i} output name", str), TensorType.from_json(_obj(o["type"], "type")),
                      node, j)
            env[v.name] = v
            g._names.add(v.name)
            outs.append(v)
        node.outputs = tuple(outs)
        for v in inputs:
            v.users[node] = None
        g.nodes.append(node)
    where[0] = "outputs"
    for k, name in _obj(obj["outputs"], "outputs").items():
        if name not in env:
            raise VerifyError(f"graph output {k!r} names %{name}, which is not defined")
        g.set_output(k, env[name])
    g.cache_map = {str(k): str(v) for k, v in _obj(obj.get("cache_map", {}), "cache_map").items()}
    g.meta = _obj(obj.get("meta", {}), "meta")
    for key in _META_INTS:
        v = g.meta.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise VerifyError(f"meta.{key} must be a positive integer, got {v!r}")
    return g


def save_graph(graph, path: str | Path) -> None:
    Path(path).write_text(json.dumps(graph_to_json(graph), indent=1))


def load_graph(path: str | Path):
    """Read and verify a saved graph; any problem with the file is a VerifyError naming it."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise VerifyError(f"{path}: cannot be read as JSON ({type(e).__name__}: {e})") from None
    g = graph_from_json(obj, source=str(path))
    try:
        g.verify()
    except VerifyError as e:
        raise VerifyError(f"{path}: {e}") from None
    return g
