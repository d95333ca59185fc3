"""A builder that reads like model code.

    b = GraphBuilder("toy", dtype="float32")
    ids = b.input("input_ids", ("B", "S"), "int64")
    emb = b.param("embed.weight", (100, 64))
    h = b.embed(ids, emb)
    with b.scope("layer0"):
        h = b.norm.rms(h, b.param("norm.weight", (64,)), eps=1e-6)
    b.output("logits", b.linear(h, b.param("head.weight", (100, 64))))
    graph = b.build()

`b.<op>(...)` and `b.<namespace>.<op>(...)` call any registered op; `name=` sets
the output's name hint; `b.scope(prefix)` prefixes the names of values built inside.
"""
from __future__ import annotations

import contextlib

from .ir import Graph, Value
from .ops.registry import get_op, iter_registered
from .types import TensorType


class _OpNamespace:
    def __init__(self, builder: "GraphBuilder", prefix: str):
        self._b = builder
        self._prefix = prefix

    def __getattr__(self, name: str) -> "_OpNamespace":
        if name.startswith("_"):
            raise AttributeError(name)
        return _OpNamespace(self._b, f"{self._prefix}.{name}")

    def __call__(self, *inputs, name: str | None = None, **attrs):
        return self._b.op(self._prefix, *inputs, name=name, **attrs)


class GraphBuilder:
    def __init__(self, name: str = "graph", dtype: str = "float32"):
        self.graph = Graph(name)
        self.dtype = dtype
        self._scope: list[str] = []

    # inputs and outputs ----------------------------------------------------
    def input(self, name: str, shape, dtype: str = "int64") -> Value:
        return self.add_input(name, TensorType(tuple(shape), dtype), "activation")

    def param(self, name: str, shape, dtype: str | None = None) -> Value:
        """A weight: shape and dtype only; the tensor lives in the model's WeightStore."""
        if name in self.graph.inputs:
            v = self.graph.inputs[name]
            want = TensorType(tuple(shape), dtype or self.dtype)
            if v.type != want or v.kind != "param":
                raise ValueError(f"param {name!r} declared twice with types {v.type} and {want}")
            return v
        if dtype is not None:  # chosen, not the compute dtype: the retype pass leaves it alone
            self.graph.meta.setdefault("pinned_dtypes", []).append(name)
        return self.add_input(name, TensorType(tuple(shape), dtype or self.dtype), "param")

    def cache_input(self, name: str, shape, dtype: str | None = None) -> Value:
        return self.add_input(name, TensorType(tuple(shape), dtype or self.dtype), "cache")

    def add_input(self, name: str, type: TensorType, kind: str) -> Value:
        """Every graph input the builder makes goes through here (a RewriteBuilder records it to undo)."""
        return self.graph.add_input(name, type, kind)

    def output(self, name: str, value: Value, cache_of: Value | None = None) -> None:
        """Mark a graph output; `cache_of` pairs it with the cache input it updates."""
        self.graph.set_output(name, value)
        if cache_of is not None:
            self.graph.cache_map[cache_of.name] = name

    # ops -------------------------------------------------------------------
    def op(self, op: str, *inputs: Value, name: str | None = None, **attrs):
        get_op(op)
        hint = name or op.split(".")[-1]
        if self._scope:
            hint = ".".join(self._scope + [hint])
        node = self.graph.add_node(op, inputs, attrs, names=hint)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def __getattr__(self, name: str) -> _OpNamespace:
        if name.startswith("_"):
            raise AttributeError(name)
        if not any(op == name or op.startswith(name + ".") for op in iter_registered()):
            raise AttributeError(f"no op or op namespace {name!r}; see dsgraph.ops.all_ops()")
        return _OpNamespace(self, name)

    @contextlib.contextmanager
    def scope(self, prefix: str):
        self._scope.append(prefix)
        try:
            yield self
        finally:
            self._scope.pop()

    def build(self) -> Graph:
        self.graph.meta.setdefault("dtype", self.dtype)  # the compute dtype (what `retype` changes)
        self.graph.verify()
        return self.graph
