"""Per-op sharding rules: given a node of the source graph, emit this rank's version and bind its outputs'
layouts. A rule asks for its inputs in the layouts it can use (`sh.value`), so conversions are inserted where
layouts disagree. Tensor parallelism is Megatron's: a column-split linear (q/k/v, q_b, kv_b, gate/up, the LM
head) gives a split output, a row-split one (o_proj, down) a partial sum that one all-reduce completes at the
residual add; heads stay split through reshape, RoPE, the cache and attention. The weight's role comes from
its checkpoint name (the Hugging Face key the builder used). Expert parallelism is in `moe_experts`.
"""
from __future__ import annotations

from dsgraph.ir import Node

from .shard_core import REP, Layout, Sharder, partial, split
from .shard_moe import moe_experts
from .weightref import weight_ref

COLUMN = {"q_proj", "k_proj", "v_proj", "q_b_proj", "lm_head", "head"}
ROW = {"o_proj"}
KV = {"k_proj", "v_proj"}


def default_rule(sh: Sharder, node: Node) -> None:
    """Every input whole, the op as it was, outputs whole."""
    outs = sh.emit(node.op, [sh.value(v, REP) for v in node.inputs], dict(node.attrs), _names(node))
    _bind_all(sh, node, outs, REP)


def _names(node: Node):
    return [v.name for v in node.outputs] if len(node.outputs) > 1 else node.outputs[0].name


def _bind_all(sh: Sharder, node: Node, outs, layout: Layout) -> None:
    outs = outs if isinstance(outs, tuple) else (outs,)
    for old, new in zip(node.outputs, outs):
        sh.bind(old, new, layout)


def _role(v) -> str:
    ref = weight_ref(v)
    return "" if ref is None else ref.base.rsplit(".", 1)[-1]


def _kv_parts(sh: Sharder) -> int:
    """KV heads split over tp, or (fewer KV heads than ranks) one head per rank, replicated tp/Hkv times."""
    c = sh.config
    hkv = c.get("num_key_value_heads") or c.get("num_attention_heads", sh.plan.tp)
    return min(hkv, sh.plan.tp)


def linear(sh: Sharder, node: Node) -> None:
    x, w = node.inputs[:2]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    role, tp, last = _role(w), sh.plan.tp, node.outputs[0].type.rank - 1
    if tp > 1 and role in COLUMN:
        parts = _kv_parts(sh) if role in KV else tp
        ins = [sh.value(x, REP), sh.value(w, split(0, parts))] + ([sh.value(bias, split(0, parts))] if bias else [])
        sh.bind(node.outputs[0], sh.emit("linear", ins, {}, node.outputs[0].name), split(last, parts))
    elif tp > 1 and role in ROW:
        y = sh.emit("linear", [sh.value(x, split(x.type.rank - 1, tp)), sh.value(w, split(1, tp))], {},
                    node.outputs[0].name)
        if bias is None:
            sh.bind(node.outputs[0], y, partial(tp))
        else:
            summed = sh.collective("dist.all_reduce", y, group=tp)
            sh.bind(node.outputs[0], sh.emit("add", [summed, sh.value(bias, REP)]), REP)
    else:
        default_rule(sh, node)


def _prod(dims):
    out = 1
    for d in dims:
        out = out * d
    return out


def reshape(sh: Sharder, node: Node) -> None:
    """A split dim maps to the output dim starting at the same flat offset, if that dim divides into the pieces."""
    x = node.inputs[0]
    new, have = sh.get(x)
    old_in, old_out = x.type.shape, node.outputs[0].type.shape
    if have.kind != "split":
        sh.bind(node.outputs[0], sh.emit("reshape", [new], dict(node.attrs), node.outputs[0].name), have)
        return
    lead = _prod(old_in[:have.dim])
    for j in range(len(old_out)):
        if _prod(old_out[:j]) == lead and isinstance(old_out[j], int) and old_out[j] % have.parts == 0 \
                and old_out[j] >= have.parts:
            shape = list(node.attrs["shape"])
            shape[j] = old_out[j] // have.parts
            out = sh.emit("reshape", [new], {"shape": tuple(shape)}, node.outputs[0].name)
            sh.bind(node.outputs[0], out, split(j, have.parts))
            return
    default_rule(sh, node)


def passthrough(position: int | None, linear_op: bool = False):
    """A rule for ops that act independently along every dim but their last (and their `dim` attr's): the input
    at `position` (None: every input) keeps its split; with `linear_op`, a partial sum stays partial."""
    def rule(sh: Sharder, node: Node) -> None:
        positions = range(len(node.inputs)) if position is None else (position,)
        layouts = {sh.get(node.inputs[i])[1] for i in positions}
        lay = layouts.pop() if len(layouts) == 1 else None
        rank = node.inputs[positions[0]].type.rank
        moved = node.attrs.get("dim")
        ok = lay is not None and (
            (lay.kind == "split" and lay.dim != rank - 1 and (moved is None or moved % rank != lay.dim))
            or (lay.kind == "partial" and linear_op))
        if not ok:
            return default_rule(sh, node)
        ins = [sh.get(v)[0] if i in positions else sh.value(v, REP) for i, v in enumerate(node.inputs)]
        _bind_all(sh, node, sh.emit(node.op, ins, dict(node.attrs), _names(node)), lay)
    return rule


def cache_append(sh: Sharder, node: Node) -> None:
    """The cache of split K/V is split the same way: this rank caches its own heads."""
    cache, new = node.inputs
    nv, lay = sh.get(new)
    if lay.kind != "split" or cache.name in sh.g.inputs:
        return default_rule(sh, node)
    shape = list(cache.type.shape)
    shape[lay.dim] = nv.type.shape[lay.dim]
    cv = sh.g.add_input(cache.name, cache.type.with_shape(shape), "cache")
    sh.bind(cache, cv, lay)
    sh.bind(node.outputs[0], sh.emit("cache.append", [cv, nv], {}, node.outputs[0].name), lay)


def attention(sh: Sharder, node: Node) -> None:
    lays = [sh.get(v)[1] for v in node.inputs]
    if not all(lay.kind == "split" and lay.dim == 2 for lay in lays):
        return default_rule(sh, node)
    out = sh.emit(node.op, [sh.get(v)[0] for v in node.inputs], dict(node.attrs), node.outputs[0].name)
    sh.bind(node.outputs[0], out, lays[0])


def decompress(sh: Sharder, node: Node) -> None:
    tp = sh.plan.tp
    if tp == 1:
        return default_rule(sh, node)
    c, k_pe, w = node.inputs
    attrs = {**node.attrs, "num_heads": node.attrs["num_heads"] // tp}
    outs = sh.emit(node.op, [sh.value(c, REP), sh.value(k_pe, REP), sh.value(w, split(0, tp))], attrs, _names(node))
    _bind_all(sh, node, outs, split(2, tp))


def swiglu(sh: Sharder, node: Node) -> None:
    tp = sh.plan.tp
    if tp == 1:
        return default_rule(sh, node)
    x, g, u, d = node.inputs
    ins = [sh.value(x, REP), sh.value(g, split(0, tp)), sh.value(u, split(0, tp)), sh.value(d, split(1, tp))]
    sh.bind(node.outputs[0], sh.emit(node.op, ins, {}, node.outputs[0].name), partial(tp))


def embed(sh: Sharder, node: Node) -> None:
    """Vocabulary-parallel lookup: this rank's rows serve ids in its range, others read 0; one all-reduce sums."""
    ids, w = node.inputs
    tp = sh.plan.tp
    if tp == 1:
        return default_rule(sh, node)
    start, stop = sh.piece(w.type.shape[0], split(0, tp), f"embedding {w.name}")
    wl, iv = sh.value(w, split(0, tp)), sh.value(ids, REP)
    local = sh.emit("sub", [iv, sh.const(start, ids.dtype)], name="ids_local")
    clamped = sh.emit("minimum", [sh.emit("maximum", [local, sh.const(0, ids.dtype)]),
                                  sh.const(stop - start - 1, ids.dtype)], name="ids_clamped")
    hit = sh.emit("reshape", [sh.emit("eq", [local, clamped])], {"shape": (*ids.type.shape, 1)}, "ids_here")
    rows = sh.emit("embed", [clamped, wl], name=node.outputs[0].name)
    out = sh.emit("where", [hit, rows, sh.const(0.0, w.dtype)], name=f"{node.outputs[0].name}.local")
    sh.bind(node.outputs[0], out, partial(tp))


def add(sh: Sharder, node: Node) -> None:
    """Partial + partial stays partial (routed + shared experts: one all-reduce for both)."""
    (a, la), (b, lb) = sh.get(node.inputs[0]), sh.get(node.inputs[1])
    if la == lb and la.kind in ("partial", "split") and node.inputs[0].type == node.inputs[1].type:
        sh.bind(node.outputs[0], sh.emit("add", [a, b], {}, node.outputs[0].name), la)
    else:
        default_rule(sh, node)


def cast(sh: Sharder, node: Node) -> None:
    new, lay = sh.get(node.inputs[0])
    if lay.kind != "split":
        return default_rule(sh, node)
    sh.bind(node.outputs[0], sh.emit("cast", [new], dict(node.attrs), node.outputs[0].name), lay)


RULES = {
    "linear": linear, "reshape": reshape, "cache.append": cache_append, "attention.gqa": attention,
    "attention.mla": attention, "mla.decompress": decompress, "mlp.swiglu": swiglu, "embed": embed,
    "add": add, "cast": cast, "moe.experts": moe_experts,
    "rope": passthrough(0), "norm.rms": passthrough(0), "split": passthrough(0, linear_op=True),
    "concat": passthrough(None),
}
