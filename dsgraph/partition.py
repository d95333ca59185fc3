"""Split a graph in two along the dependence on some inputs.

`split_graph(g, {"mtp_ids"})` gives the main model and the MTP branch as two graphs:
every node that (transitively) reads one of the seed inputs goes to the second
graph; values the second graph needs from the first cross over as outputs
`xfer.<name>` of the first and inputs `<name>` of the second (values of weights and of
inputs both graphs take, such as positions, are recomputed there instead). The speculative
decoder runs them as separate steps (the MTP step needs the main step's output).
"""
from __future__ import annotations

from .ir import Graph

XFER = "xfer."


def split_graph(graph: Graph, seeds: set[str]) -> tuple[Graph, Graph]:
    missing = seeds - set(graph.inputs)
    if missing:
        raise KeyError(f"split_graph: graph {graph.name} has no inputs {sorted(missing)}")
    tainted = {id(graph.inputs[s]) for s in seeds}
    tail_nodes = set()
    for node in graph.nodes:
        if any(id(v) in tainted for v in node.inputs):
            tail_nodes.add(id(node))
            tainted.update(id(v) for v in node.outputs)
    # a node only the second graph reads goes there too, so what crosses is the first graph's own result (V4's MTP
    # norms and projects the main streams itself: the streams cross, as the MTP block's output does when chained)
    outputs = {id(v) for v in graph.outputs.values()}
    for node in reversed(graph.nodes):
        users = [u for v in node.outputs for u in v.users]
        if (id(node) not in tail_nodes and node.inputs and users and all(id(u) in tail_nodes for u in users)
                and not any(id(v) in outputs for v in node.outputs)):
            tail_nodes.add(id(node))
    # values computed from params and from inputs the second graph takes anyway (positions) alone are recomputed
    # on both sides instead of crossing over (common-subexpression elimination may have merged them): only the
    # first graph's per-token results cross
    inputs = {id(v) for v in graph.inputs.values()}
    weight_only = {id(v) for v in graph.inputs.values() if v.kind == "param"}
    weight_only.update(id(v) for n in graph.nodes if id(n) in tail_nodes for v in n.inputs if id(v) in inputs)
    for node in graph.nodes:
        if id(node) not in tail_nodes and all(id(v) in weight_only for v in node.inputs):
            weight_only.update(id(v) for v in node.outputs)
    needed = set()
    for node in reversed(graph.nodes):
        if id(node) in tail_nodes or any(id(v) in needed for v in node.outputs):
            if id(node) not in tail_nodes and not all(id(v) in weight_only for v in node.outputs):
                continue
            needed.update(id(v) for v in node.inputs if id(v) in weight_only)
    const_for_tail = {id(n) for n in graph.nodes if id(n) not in tail_nodes
                      and any(id(v) in needed for v in n.outputs)}
    head_nodes = [n for n in graph.nodes if id(n) not in tail_nodes]
    tail_nodes_list = [n for n in graph.nodes if id(n) in tail_nodes or id(n) in const_for_tail]
    head_values = {id(v) for n in head_nodes for v in n.outputs if id(n) not in const_for_tail}
    crossing = {}
    for n in tail_nodes_list:
        crossing.update({v.name: v for v in n.inputs if id(v) in head_values})
    head = _build(graph, head_nodes, f"{graph.name}_main", {})
    for name in crossing:
        head.set_output(XFER + name, head.value(name))
    tail = _build(graph, tail_nodes_list, f"{graph.name}_branch", crossing)
    head.verify()
    tail.verify()
    return head, tail


def _build(graph: Graph, nodes, name: str, extra_inputs) -> Graph:
    g = Graph(name)
    g.meta = dict(graph.meta)
    env = {}
    used = {id(v) for n in nodes for v in n.inputs}
    for name, v in graph.inputs.items():
        if id(v) in used:
            env[id(v)] = g.add_input(name, v.type, v.kind)
    for name, v in extra_inputs.items():
        env[id(v)] = g.add_input(name, v.type, "activation")
    for n in nodes:
        new = g.add_node(n.op, [env[id(v)] for v in n.inputs], n.attrs, names=[v.name for v in n.outputs],
                         meta=n.meta)
        for old, nv in zip(n.outputs, new.outputs):
            env[id(old)] = nv
    for out_name, v in graph.outputs.items():
        if id(v) in env and v.name not in extra_inputs:
            g.set_output(out_name, env[id(v)])
    for cin, cout in graph.cache_map.items():
        if cin in g.inputs and cout in g.outputs:
            g.cache_map[cin] = cout
    return g
