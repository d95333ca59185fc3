"""Retype a graph to another compute dtype: what `dsgraph.compile(..., dtype=...)` runs when the model's graph was
built in another one, so any graph built with GraphBuilder (a zoo model, a loaded checkpoint, a saved or
hand-written graph) compiles in any float dtype without going back to the model builder.

The compute dtype is `graph.meta["dtype"]` (GraphBuilder.build records it). Float inputs (params, caches,
activations) of that dtype take the new one, except params declared with an explicit dtype
(`graph.meta["pinned_dtypes"]`: the fp32 router, FP8 block scales). Casts to the old compute dtype follow it, every
node's output types are inferred again in graph order, and FP8 weights keep DeepSeek's form: `dequant_fp8` gives
fp32, cast to the compute dtype unless that is fp32. Run it first: later passes see the graph in its final dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsgraph.dtypes import is_float
from dsgraph.errors import PassError
from dsgraph.ir import Graph, Node
from dsgraph.types import TensorType
from dsgraph.weights import WeightStore

from .base import Pass, register

FLOAT32 = "float32"


@register
@dataclass
class Retype(Pass):
    """Change the graph's compute dtype to `dtype` (types only: weights are cast when a backend loads them)."""

    name = "retype"
    description = "change the compute dtype (params, caches, activations) and re-infer every type"
    dtype: str = "bfloat16"

    def check_preconditions(self, graph: Graph) -> None:
        if "dtype" not in graph.meta:
            raise PassError(f"retype: graph {graph.name} records no compute dtype (graph.meta['dtype']); build it "
                            "with GraphBuilder.build(), or set the meta key")
        if not is_float(self.dtype):
            raise PassError(f"retype: {self.dtype!r} is not a float dtype")

    def run(self, graph: Graph, weights: WeightStore) -> dict:
        old, new = graph.meta["dtype"], self.dtype
        if old == new:
            return {"rewritten": 0}
        pinned = set(graph.meta.get("pinned_dtypes", ()))
        inputs = 0
        for name, v in graph.inputs.items():
            if v.type.dtype == old and name not in pinned:
                v.type = TensorType(v.type.shape, new)
                inputs += 1
        casts, added = 0, {}
        for node in list(graph.nodes):
            if node.op == "cast" and node.attrs["dtype"] == old and old != FLOAT32:
                node.attrs["dtype"] = new
                casts += 1
            _infer(node)
            if node.op == "dequant_fp8" and new != FLOAT32 and (cast := _cast_dequant(graph, node, new)):
                added[id(node)] = cast
        _place_after(graph, added)
        casts += len(added) + _drop_noop_dequant_casts(graph)
        graph.meta["dtype"] = new
        return {"rewritten": inputs + casts, "inputs": inputs, "casts": casts}


def _infer(node: Node) -> None:
    for v, t in zip(node.outputs, node.opdef.infer_types([v.type for v in node.inputs], node.attrs)):
        v.type = t


def _cast_dequant(graph: Graph, dq: Node, dtype: str) -> Node | None:
    """Readers of an fp32 dequantised weight that are not casts read it cast to the compute dtype: the cast (added
    at the graph's end; _place_after moves it), or None where every reader casts already."""
    out = dq.outputs[0]
    readers = [u for u in out.users if u.op != "cast"]
    if not readers:
        return None
    cast = graph.add_node("cast", [out], {"dtype": dtype}, names=f"{out.name}.cast")
    for user in readers:
        for i, v in enumerate(user.inputs):
            if v is out:
                graph.replace_input(user, i, cast.outputs[0])
    return cast


def _place_after(graph: Graph, added: dict[int, Node]) -> None:
    """Each added node right after the node it was made for (id -> node), in one pass over the node list: a
    full-size V3 has tens of thousands of FP8 weights, and inserting each in place would be quadratic."""
    if not added:
        return
    moved = {id(n) for n in added.values()}
    order = []
    for n in graph.nodes:
        if id(n) not in moved:
            order.append(n)
            if id(n) in added:
                order.append(added[id(n)])
    graph.nodes[:] = order


def _drop_noop_dequant_casts(graph: Graph) -> int:
    """cast(dequant_fp8(w, s), float32) is the dequantised weight itself."""
    dropped = 0
    for node in list(graph.nodes):
        src = node.inputs[0] if node.op == "cast" else None
        if src is not None and src.node is not None and src.node.op == "dequant_fp8" \
                and node.outputs[0].type == src.type:
            graph.replace_all_uses(node.outputs[0], src)
            graph.erase_node(node)
            dropped += 1
    return dropped
