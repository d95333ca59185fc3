"""The shard pass's machinery: one rank's graph of a `ParallelPlan`, collectives inserted, weights sliced lazily.

The pass re-emits the graph node by node (in order) and tracks, for every value, how this rank holds it
(a `Layout`): whole (`REP`), a piece along one dim over its TP group (`split`), or a partial sum the ranks of a
group add up (`partial(group)`: the TP group's tp ranks, or the world's for expert-parallel MoE). TP groups are
contiguous blocks of tp ranks (`ParallelPlan`); their collectives carry group_size=tp. Per-op rules
(`shard_rules.py`) choose the layouts an op can take its inputs in and what its output is then; a value in the
wrong layout is converted (`Sharder.value`: all_reduce, all_gather, reduce_scatter, or a local slice), and an op
without a rule takes every input whole, so any graph shards correctly, if not cheaply.

Weights are sliced, never gathered: a param (or its FP8 dequantisation, or a cast of it) is emitted only when
a rule asks for it in some layout, as this rank's slice (`graph.meta["shard"]["params"]` records each slice as
[source name, dim, start, stop], for the sharded loader); FP8 block scales are sliced along with their blocks.
Run it first, on the graph as the model builder wrote it: absorb_mla, group_moe and the rest then run per rank
(the absorbed latent cache and its heads' absorbed weights live on each rank).
"""
from __future__ import annotations

from dataclasses import dataclass

from dsgraph.errors import ConfigError, PassError
from dsgraph.ir import Graph, Value
from dsgraph.parallel import ParallelPlan
from dsgraph.weights import WeightStore


@dataclass(frozen=True)
class Layout:
    """How a rank holds a value: kind 'rep' | 'split' | 'partial'; a split has its `dim` and `parts` (pieces
    over the TP group: TP rank t holds piece t * parts // tp, so parts < tp replicates each piece); a partial
    sum the `group` (size) of ranks it is summed over."""

    kind: str
    dim: int = -1
    parts: int = 1
    group: int = 0

    def __str__(self) -> str:
        if self.kind == "split":
            return f"split(dim={self.dim}, parts={self.parts})"
        return f"partial(group={self.group})" if self.kind == "partial" else self.kind


REP = Layout("rep")


def split(dim: int, parts: int) -> Layout:
    return Layout("split", dim, parts)


def partial(group: int) -> Layout:
    return Layout("partial", group=group)


def weight_nodes(graph: Graph) -> set[int]:
    """ids of the nodes computed from params alone (FP8 dequantisation, casts of weights): emitted on demand."""
    out: set[int] = set()
    from_params: set[int] = {id(v) for v in graph.params().values()}
    for node in graph.nodes:
        if node.inputs and all(id(v) in from_params for v in node.inputs) and node.op != "constant":
            out.add(id(node))
            from_params.update(id(v) for v in node.outputs)
    return out


class Sharder:
    """The state of one re-emission: the new graph and weights, and every old value's (new value, layout)."""

    def __init__(self, src: Graph, weights: WeightStore, plan: ParallelPlan, rank: int):
        self.src, self.weights, self.plan, self.rank = src, weights, plan, rank
        self.tp, self.tp_rank = plan.tp, rank % plan.tp
        self.g = Graph(src.name)
        self.new_weights = WeightStore(reader=weights.reader)
        self.env: dict[int, tuple[Value, Layout]] = {}
        self.params: dict[tuple[str, Layout], Value] = {}
        self.slices: dict[str, list] = {}
        self.cache_layouts: dict[str, str] = {}
        self.symbols = 0
        self.weight_nodes = weight_nodes(src)
        self.config = src.meta.get("config", {})
        self.pinned = set(src.meta.get("pinned_dtypes", ()))

    # emitting ----------------------------------------------------------------------------------------
    def emit(self, op: str, inputs, attrs: dict | None = None, name: str | None = None):
        node = self.g.add_node(op, list(inputs), attrs or {}, names=name)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def const(self, value, dtype: str, shape=()):
        return self.emit("constant", [], {"value": value, "shape": shape, "dtype": dtype}, "c")

    def collective(self, op: str, *xs: Value, group: int, **attrs):
        """`op` over this rank's group of `group` ranks (tp: its TP block; the world)."""
        return self.emit(op, xs, {"group_size": group, **attrs}, f"{xs[0].name}.{op.split('.')[1]}")

    def fresh_symbol(self) -> str:
        self.symbols += 1
        return f"R{self.symbols}"

    def bind(self, old: Value, new: Value, layout: Layout) -> None:
        self.env[id(old)] = (new, layout)

    # values in a layout ------------------------------------------------------------------------------
    def get(self, old: Value) -> tuple[Value, Layout]:
        if id(old) not in self.env:
            if old.kind == "param" or (old.node is not None and id(old.node) in self.weight_nodes):
                return self.weight(old, REP), REP
            if old.node is not None:
                raise PassError(f"shard: %{old.name} is used before it is emitted")
            self.bind(old, self.g.add_input(old.name, old.type, old.kind), REP)
        return self.env[id(old)]

    def value(self, old: Value, want: Layout) -> Value:
        """`old` as this rank holds it in layout `want`: weights are sliced at the source, activations converted."""
        if old.kind == "param" or (old.node is not None and id(old.node) in self.weight_nodes):
            return self.weight(old, want)
        new, have = self.get(old)
        return self.convert(new, have, want)

    def convert(self, new: Value, have: Layout, want: Layout) -> Value:
        if have == want:
            return new
        tp = self.tp
        if have.kind == "split" and have.parts != tp:
            raise PassError(f"shard: %{new.name} is held {have} (replicated pieces) and cannot become {want}")
        if have.kind == "partial":
            if want.kind == "split" and want.parts == tp == have.group and _divides(new.shape[want.dim], tp):
                return self.collective("dist.reduce_scatter", new, group=tp, dim=want.dim)
            new, have = self.collective("dist.all_reduce", new, group=have.group), REP
        if have.kind == "split":
            new, have = self.collective("dist.all_gather", new, group=tp, dim=have.dim), REP
        if want == REP:
            return new
        if want.kind == "split":
            start, stop = self.piece(new.shape[want.dim], want, new.name)
            return self.emit("slice", [new], {"dim": want.dim, "start": start, "end": stop}, f"{new.name}.piece")
        raise PassError(f"shard: cannot make %{new.name} {want} from {have} (a partial sum is produced by an op)")

    def piece(self, size, layout: Layout, what: str) -> tuple[int, int]:
        """[start, stop) of this rank's piece of a dim of `size`."""
        if not _divides(size, layout.parts):
            raise ConfigError(f"{self.plan} does not divide {what} (dim {layout.dim} of size {size}) into "
                              f"{layout.parts} parts: choose a plan whose sizes divide it")
        n = size // layout.parts
        k = self.tp_rank * layout.parts // self.tp
        return k * n, (k + 1) * n

    # weights -----------------------------------------------------------------------------------------
    def weight(self, old: Value, want: Layout) -> Value:
        key = (old.name, want)
        if key in self.params:
            return self.params[key]
        if old.kind == "param":
            out = self.param_slice(old, want)
        else:
            out = self.weight_expr(old, want)
        self.params[key] = out
        return out

    def param_slice(self, old: Value, want: Layout, rows: tuple[int, int] | None = None) -> Value:
        """A param holding this rank's slice (`rows` overrides the piece: FP8 scale blocks)."""
        if want == REP:
            name, shape, spec = old.name, old.type.shape, None
        elif want.kind == "split":
            d = want.dim % old.type.rank
            start, stop = rows or self.piece(old.type.shape[d], want, f"param {old.name}")
            shape = old.type.shape[:d] + (stop - start,) + old.type.shape[d + 1:]
            name, spec = old.name, [old.name, d, start, stop]
        else:
            raise PassError(f"shard: weight {old.name} cannot be {want}")
        if name in self.g.inputs:  # the same weight in another layout (a tied embedding read whole)
            name = f"{name}.{'full' if spec is None else f'part{spec[1]}'}"
        v = self.g.add_input(name, old.type.with_shape(shape), "param")
        if old.name in self.pinned:
            self.g.meta.setdefault("pinned_dtypes", []).append(name)
        if spec is None:
            if old.name in self.weights:
                self.new_weights.set(name, self.weights.entry(old.name))
        else:
            self.slices[name] = spec
            src, d, start, stop = spec
            self.new_weights.set(name, lambda: self.weights.slice(src, d, start, stop))
        return v

    def weight_expr(self, old: Value, want: Layout) -> Value:
        node = old.node
        if want == REP or node.op not in ("dequant_fp8", "cast"):
            inputs = [self.weight(v, REP) for v in node.inputs]
            out = self.emit(node.op, inputs, dict(node.attrs), old.name)
            return self.convert(out, REP, want)
        if node.op == "cast":
            return self.emit("cast", [self.weight(node.inputs[0], want)], dict(node.attrs), old.name)
        w, s = node.inputs
        bn = node.attrs["block"][want.dim % 2]
        start, stop = self.piece(w.type.shape[want.dim % 2], want, f"FP8 weight {w.name}")
        if start % bn or (stop % bn and stop != w.type.shape[want.dim % 2]):
            raise ConfigError(f"{self.plan} cuts FP8 weight {w.name} at row {start}, inside a {bn}-wide scale "
                              f"block: choose a plan whose slices are whole blocks")
        ws = self.weight(w, want)
        ss = self.param_slice(s, Layout("split", want.dim % 2, want.parts), (start // bn, -(-stop // bn)))
        return self.emit("dequant_fp8", [ws, ss], dict(node.attrs), old.name)


def _divides(size, parts: int) -> bool:
    return isinstance(size, int) and size % parts == 0
