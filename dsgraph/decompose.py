"""Insert an op's decomposition into an existing graph.

A legalization pass lowers a domain op a backend has no kernel for by calling

    new = decompose_node(graph, node)
    for old, v in zip(node.outputs, new):
        graph.replace_all_uses(old, v)
    graph.erase_node(node)

The decomposition runs against a GraphBuilder bound to `graph` with new nodes
placed right before `node`, so topological order holds without re-sorting. Its
outputs must have exactly the node's output types (checked here, naming the op),
otherwise `replace_all_uses` would change the graph's types behind the caller.
"""
from __future__ import annotations

from .builder import GraphBuilder
from .errors import UnknownOpError, VerifyError
from .ir import Graph, Node, Value
from .ops.registry import get_op


class _InsertingBuilder(GraphBuilder):
    """GraphBuilder over an existing graph; names built values `<origin>.<op>` and stamps meta["origin"]."""

    def __init__(self, graph: Graph, origin: str):
        self.graph = graph
        self.dtype = "float32"  # only used for params, which decompositions never declare
        self._scope = [origin]
        self._origin = origin

    def op(self, op: str, *inputs: Value, name: str | None = None, **attrs):
        hint = ".".join(self._scope + [name or op.split(".")[-1]])
        node = self.graph.add_node(op, inputs, attrs, names=hint, meta={"origin": self._origin})
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs


def decompose_node(graph: Graph, node: Node, recursive: bool = False) -> list[Value]:
    """Build `node`'s decomposition right before it; returns the values replacing its outputs.

    The node itself is left in place (the caller rewires and erases it). With
    `recursive=True`, domain ops the decomposition used are decomposed in turn
    (and erased), so only primitives remain.
    """
    opdef = get_op(node.op)
    if opdef.decompose_fn is None:
        raise UnknownOpError(f"op {node.op} has no decomposition; give it a kernel in the backend "
                             f"or register one with @get_op({node.op!r}).decomposition")
    before = len(graph.nodes)
    start = graph.nodes.index(node)
    with graph.inserting_before(node):
        out = opdef.decompose_fn(_InsertingBuilder(graph, node.outputs[0].name), *node.inputs, **node.attrs)
    outs = [out] if isinstance(out, Value) else list(out)
    if len(outs) != len(node.outputs) or any(a.type != b.type for a, b in zip(outs, node.outputs)):
        got = ", ".join(str(v.type) for v in outs)
        want = ", ".join(str(v.type) for v in node.outputs)
        raise VerifyError(f"decomposition of {node.format(6)} gives ({got}), the op declares ({want})")
    if recursive:
        for inner in graph.nodes[start:start + len(graph.nodes) - before]:
            if get_op(inner.op).level == "domain":
                for old, new in zip(inner.outputs, decompose_node(graph, inner, recursive=True)):
                    graph.replace_all_uses(old, new)
                    if old in outs:
                        outs[outs.index(old)] = new
                graph.erase_node(inner)
    return outs
