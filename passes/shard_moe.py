"""Sharding rules for routed experts (`moe.experts`, per-expert form), by plan:

  tp only          every expert TP-split like a dense MLP (gate/up by rows, down by columns): a partial sum
  ep, tokens whole rank r runs its E/ep experts on every token, gates of other ranks' experts zeroed: a partial
                   sum (DeepSeek's inference/model.py does this, one all-reduce after the layer)
  ep + dp_attention each rank routes its own tokens; token copies, sorted by expert (moe.permute), go to their
                   experts' ranks with dist.all_to_all (split sizes from the sorted expert offsets), run there,
                   come back with the reverse all_to_all and are combined with their gates (moe.unpermute).
                   With tp > 1 the ranks of a TP group hold the same tokens: TP rank t dispatches only its share
                   of each token's top-k slots (slots t*k//tp ..), a partial sum over the TP group

Expert parallelism runs over the world (collectives with group_size = the world), also when tp < world.

Routing always runs whole on each rank (the router weight is small). Shared experts are an ordinary
mlp.swiglu: TP-split when tp > 1 (their partial sum joins the experts'), else replicated.
"""
from __future__ import annotations

from dsgraph.ir import Node

from .shard_core import REP, Sharder, partial, split


def _experts(node: Node):
    return node.inputs[:3], node.inputs[3:], node.attrs["num_experts"]


def moe_experts(sh: Sharder, node: Node) -> None:
    plan = sh.plan
    if plan.dp_attention:
        return _dispatch(sh, node)
    (x, w, idx), ws, e = _experts(node)
    if plan.ep > 1:
        return _local_experts(sh, node)
    if plan.tp == 1:
        outs = sh.emit(node.op, [sh.value(v, REP) for v in node.inputs], dict(node.attrs), node.outputs[0].name)
        return sh.bind(node.outputs[0], outs, REP)
    lay = [split(0, plan.tp), split(0, plan.tp), split(1, plan.tp)]
    tp_ws = [sh.value(v, lay[i % 3]) for i, v in enumerate(ws)]
    out = sh.emit(node.op, [sh.value(x, REP), sh.value(w, REP), sh.value(idx, REP), *tp_ws], dict(node.attrs),
                  node.outputs[0].name)
    sh.bind(node.outputs[0], out, partial(plan.tp))


def _mine(sh: Sharder, e: int) -> tuple[int, int]:
    """(first expert, count) of this rank's experts."""
    n = e // sh.plan.ep
    return sh.rank * n, n


def _localize(sh: Sharder, ids, first: int, count: int):
    """(expert ids relative to `first`, clamped into range; bool: the id was this rank's)."""
    local = sh.emit("sub", [ids, sh.const(first, ids.dtype)], name="expert_local")
    clamped = sh.emit("minimum", [sh.emit("maximum", [local, sh.const(0, ids.dtype)]),
                                  sh.const(count - 1, ids.dtype)], name="expert_clamped")
    return clamped, sh.emit("eq", [local, clamped], name="expert_here")


def _local_weights(sh: Sharder, ws, first: int, count: int) -> list:
    return [sh.value(v, REP) for v in ws[3 * first: 3 * (first + count)]]


def _local_experts(sh: Sharder, node: Node) -> None:
    (x, w, idx), ws, e = _experts(node)
    first, count = _mine(sh, e)
    wv = sh.value(w, REP)
    local, here = _localize(sh, sh.value(idx, REP), first, count)
    gates = sh.emit("where", [here, wv, sh.const(0.0, wv.dtype)], name="gates_here")
    out = sh.emit(node.op, [sh.value(x, REP), gates, local, *_local_weights(sh, ws, first, count)],
                  {"num_experts": count}, node.outputs[0].name)
    sh.bind(node.outputs[0], out, partial(sh.plan.world))


def _dispatch(sh: Sharder, node: Node) -> None:
    (x, w, idx), ws, e = _experts(node)
    first, count = _mine(sh, e)
    world = sh.plan.world
    xv, wv, iv = sh.value(x, REP), sh.value(w, REP), sh.value(idx, REP)
    if sh.tp > 1:  # this TP rank's slots
        k = iv.type.shape[1]
        slots = {"dim": 1, "start": sh.tp_rank * k // sh.tp, "end": (sh.tp_rank + 1) * k // sh.tp}
        wv, iv = (sh.emit("slice", [v], slots, f"{v.name}.slots") for v in (wv, iv))
    m = iv.type.shape[0] * iv.type.shape[1]
    xp, order, offsets = sh.emit("moe.permute", [xv, iv], {"num_experts": e}, ["dispatch_x", "order", "offsets"])
    bounds = sh.emit("index_select", [offsets, sh.const(tuple(range(0, e + 1, count)), "int64", (world + 1,))],
                     name="rank_bounds")
    send = sh.emit("sub", [sh.emit("slice", [bounds], {"dim": 0, "start": 1, "end": world + 1}),
                           sh.emit("slice", [bounds], {"dim": 0, "start": 0, "end": world})], name="send_counts")
    ids = sh.emit("index_select", [sh.emit("reshape", [iv], {"shape": (m,)}), order], name="sorted_experts")
    ids = sh.emit("reshape", [ids], {"shape": (m, 1)})
    rows = sh.fresh_symbol()
    x_in, recv = sh.collective("dist.all_to_all", xp, send, group=world, rows=rows)
    ids_in, _ = sh.collective("dist.all_to_all", ids, send, group=world, rows=rows)
    local = sh.emit("sub", [ids_in, sh.const(first, "int64")], name="expert_local")
    ones = sh.emit("expand", [sh.const(1.0, wv.dtype, (1, 1))], {"shape": (rows, 1)}, "ones")
    y = sh.emit(node.op, [x_in, ones, local, *_local_weights(sh, ws, first, count)], {"num_experts": count},
                "experts_out")
    back, _ = sh.collective("dist.all_to_all", y, recv, group=world, rows=m)
    out = sh.emit("moe.unpermute", [back, wv, order], {}, node.outputs[0].name)
    sh.bind(node.outputs[0], out, partial(sh.tp) if sh.tp > 1 else REP)
