"""The graph IR: values, nodes and graphs kept in topological order.

A `Node` is small (op, inputs, attrs, outputs, meta), as in torch.fx. Use-def
lists are kept by the graph's own editing methods (`add_node`, `replace_input`,
`replace_all_uses`, `erase_node`); passes never edit edges by hand.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Any, Iterator

from .analysis import summarize
from .errors import ShapeError, VerifyError
from .ops.registry import get_op
from .printer import format_graph
from .types import TensorType
from .verify import verify as verify_graph

INPUT_KINDS = ("activation", "param", "cache")


class Value:
    """An SSA value: a graph input (kind activation/param/cache) or a node output."""

    __slots__ = ("name", "type", "node", "index", "kind", "users")

    def __init__(self, name: str, type: TensorType, node: "Node | None" = None,
                 index: int = 0, kind: str | None = None):
        self.name = name
        self.type = type
        self.node = node
        self.index = index
        self.kind = kind
        self.users: dict[Node, None] = {}

    @property
    def is_input(self) -> bool:
        return self.node is None

    @property
    def shape(self):
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    def __repr__(self) -> str:
        return f"%{self.name}"


class Node:
    """One op application; outputs are fresh Values this node alone defines."""

    __slots__ = ("op", "inputs", "attrs", "outputs", "meta")

    def __init__(self, op: str, inputs: tuple[Value, ...], attrs: dict[str, Any]):
        self.op = op
        self.inputs = inputs
        self.attrs = attrs
        self.outputs: tuple[Value, ...] = ()
        self.meta: dict[str, Any] = {}

    @property
    def out(self) -> Value:
        if len(self.outputs) != 1:
            raise VerifyError(f"{self.op} has {len(self.outputs)} outputs; use .outputs")
        return self.outputs[0]

    @property
    def opdef(self):
        return get_op(self.op)

    def format(self, max_inputs: int = 12) -> str:
        outs = ", ".join(f"%{v.name}" for v in self.outputs)
        ins = [f"%{v.name}" for v in self.inputs]
        if len(ins) > max_inputs:
            ins = ins[: max_inputs - 2] + [f"… {len(ins) - max_inputs + 1} more", ins[-1]]
        attrs = ", ".join(f"{k}={v!r}" for k, v in self.attrs.items())
        types = ", ".join(str(v.type) for v in self.outputs)
        return f"{outs} = {self.op}({', '.join(ins)}){' {' + attrs + '}' if attrs else ''} : {types}"

    def __repr__(self) -> str:
        return self.format()


class Graph:
    """A DAG of nodes in topological order with named inputs and outputs.

    Inputs have a kind: `activation` (token ids, positions), `param` (weights;
    shape and dtype only, tensors live in a separate WeightStore) or `cache`
    (KV cache, updated functionally: `cache_map` pairs each cache input with the
    output holding its next state).
    """

    def __init__(self, name: str = "graph"):
        self.name = name
        self.inputs: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.outputs: dict[str, Value] = {}
        self.cache_map: dict[str, str] = {}
        self.meta: dict[str, Any] = {}
        self._names: set[str] = set()
        self._counter = itertools.count()
        self._insert_at: int | None = None

    # naming ----------------------------------------------------------------
    def fresh_name(self, hint: str) -> str:
        hint = hint or "v"
        if hint not in self._names:
            return hint
        while True:
            name = f"{hint}_{next(self._counter)}"
            if name not in self._names:
                return name

    # construction ----------------------------------------------------------
    def add_input(self, name: str, type: TensorType, kind: str = "activation") -> Value:
        if kind not in INPUT_KINDS:
            raise VerifyError(f"input {name!r}: kind must be one of {INPUT_KINDS}, not {kind!r}")
        if name in self._names:
            raise VerifyError(f"input name {name!r} is already used in graph {self.name}")
        v = Value(name, type, kind=kind)
        self._names.add(name)
        self.inputs[name] = v
        return v

    def add_node(self, op: str, inputs: list[Value] | tuple[Value, ...], attrs: dict | None = None,
                 names: list[str] | tuple[str, ...] | str | None = None, meta: dict | None = None) -> Node:
        """Create a node after type-checking it; the error names the node being built."""
        opdef = get_op(op)
        inputs = tuple(inputs)
        for v in inputs:
            if not isinstance(v, Value):
                raise ShapeError(f"{op}: input {v!r} is not a graph Value")
        try:
            opdef.check_arity(len(inputs))
            attrs = opdef.normalize_attrs(dict(attrs or {}))
            out_types = opdef.infer_types([v.type for v in inputs], attrs)
        except ShapeError as e:
            args = ", ".join(f"%{v.name}: {v.type}" for v in inputs[:8])
            raise ShapeError(f"while building {op}({args}{', …' if len(inputs) > 8 else ''}): {e}") from None
        node = Node(op, inputs, attrs)
        if meta:
            node.meta.update(meta)
        if names is None or isinstance(names, str):
            base = names or op.split(".")[-1]
            names = [base] if len(out_types) == 1 else [f"{base}.{i}" for i in range(len(out_types))]
        if len(names) != len(out_types):
            raise ShapeError(f"{op}: {len(names)} output names for {len(out_types)} outputs")
        outs = []
        for i, (n, t) in enumerate(zip(names, out_types)):
            name = self.fresh_name(n)
            self._names.add(name)
            outs.append(Value(name, t, node, i))
        node.outputs = tuple(outs)
        for v in inputs:
            v.users[node] = None
        if self._insert_at is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self._insert_at, node)
            self._insert_at += 1
        return node

    @contextlib.contextmanager
    def inserting_before(self, node: Node):
        """New nodes go right before `node` (keeps topological order for rewrites)."""
        saved = self._insert_at
        self._insert_at = self.nodes.index(node)
        try:
            yield
        finally:
            self._insert_at = saved

    def set_output(self, name: str, value: Value) -> None:
        self.outputs[name] = value

    # editing ---------------------------------------------------------------
    def replace_input(self, node: Node, index: int, new: Value) -> None:
        old = node.inputs[index]
        node.inputs = node.inputs[:index] + (new,) + node.inputs[index + 1:]
        if old not in node.inputs:
            old.users.pop(node, None)
        new.users[node] = None

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Point every user and graph output of `old` at `new` (types must match)."""
        if old.type != new.type:
            raise VerifyError(f"cannot replace %{old.name}: {old.type} with %{new.name}: {new.type}")
        for user in list(old.users):
            user.inputs = tuple(new if v is old else v for v in user.inputs)
            new.users[user] = None
        old.users.clear()
        for k, v in self.outputs.items():
            if v is old:
                self.outputs[k] = new

    def erase_node(self, node: Node) -> None:
        for v in node.outputs:
            if v.users or v in self.outputs.values():
                raise VerifyError(f"cannot erase {node.op} defining %{v.name}: still used")
        for v in node.inputs:
            v.users.pop(node, None)
        self.nodes.remove(node)
        for v in node.outputs:
            self._names.discard(v.name)

    def remove_input(self, name: str) -> None:
        v = self.inputs[name]
        if v.users or v in self.outputs.values():
            raise VerifyError(f"cannot remove input %{name}: still used")
        del self.inputs[name]
        self._names.discard(name)

    def eliminate_dead_code(self) -> int:
        """Drop nodes whose outputs reach no graph output; returns how many were removed."""
        live: set[int] = {id(v) for v in self.outputs.values()}
        keep: list[Node] = []
        removed = 0
        for node in reversed(self.nodes):
            if any(id(v) in live for v in node.outputs):
                keep.append(node)
                live.update(id(v) for v in node.inputs)
            else:
                for v in node.inputs:
                    v.users.pop(node, None)
                for v in node.outputs:
                    self._names.discard(v.name)
                removed += 1
        self.nodes = keep[::-1]
        return removed

    def remove_unused_inputs(self, kinds: tuple[str, ...] = ("param",)) -> list[str]:
        gone = [n for n, v in self.inputs.items()
                if v.kind in kinds and not v.users and v not in self.outputs.values()]
        for n in gone:
            self.remove_input(n)
        return gone

    # queries ---------------------------------------------------------------
    def params(self) -> dict[str, Value]:
        return {n: v for n, v in self.inputs.items() if v.kind == "param"}

    def activations(self) -> dict[str, Value]:
        return {n: v for n, v in self.inputs.items() if v.kind == "activation"}

    def caches(self) -> dict[str, Value]:
        return {n: v for n, v in self.inputs.items() if v.kind == "cache"}

    def find(self, op: str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    def values(self) -> Iterator[Value]:
        yield from self.inputs.values()
        for n in self.nodes:
            yield from n.outputs

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(f"no value %{name} in graph {self.name}")

    # checking and copying ----------------------------------------------------
    def verify(self) -> None:
        verify_graph(self)

    def copy(self) -> "Graph":
        """A deep copy of the structure (weights are not part of a graph). Types and attribute values are
        immutable and shared; values, nodes, use-def lists and metadata are new."""
        g = Graph(self.name)
        env: dict[int, Value] = {}
        for name, v in self.inputs.items():
            env[id(v)] = g.inputs[name] = Value(name, v.type, kind=v.kind)
        for n in self.nodes:
            node = Node(n.op, tuple(env[id(v)] for v in n.inputs), dict(n.attrs))
            if n.meta:
                node.meta = copy.deepcopy(n.meta)
            node.outputs = tuple(Value(v.name, v.type, node, v.index) for v in n.outputs)
            for old, new in zip(n.outputs, node.outputs):
                env[id(old)] = new
            for v in node.inputs:
                v.users[node] = None
            g.nodes.append(node)
        g.outputs = {k: env[id(v)] for k, v in self.outputs.items()}
        g.cache_map = dict(self.cache_map)
        g.meta = copy.deepcopy(self.meta)
        g._names = {v.name for v in env.values()}
        return g

    def __str__(self) -> str:
        return format_graph(self)

    def summary(self, **kw):
        return summarize(self, **kw)
