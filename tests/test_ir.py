"""The graph IR: builder, editing API, verify() (one test per failure kind), printer, JSON,
the interpreter's checks, and the "done when" toy graph against plain torch."""
import json

import pytest
import torch

from dsgraph import (
    CheckpointError,
    DSGraphError,
    GraphBuilder,
    InputError,
    ShapeError,
    UnknownOpError,
    VerifyError,
    graph_from_json,
    graph_to_json,
    load_graph,
    run,
    save_graph,
    to_networkx,
    tt,
)
from dsgraph.interpreter import Interpreter
from dsgraph.ir import Node, Value
from dsgraph.partition import XFER, split_graph

G = torch.Generator().manual_seed(3)


def R(*shape):
    return torch.randn(shape, generator=G)


def toy(vocab=11, d=8, out=5):
    """embedding -> RMSNorm -> linear -> softmax, over symbolic B, S."""
    b = GraphBuilder("toy")
    ids = b.input("input_ids", ("B", "S"))
    h = b.embed(ids, b.param("embed.weight", (vocab, d)), name="h")
    with b.scope("layer0"):
        h = b.norm.rms(h, b.param("norm.weight", (d,)), eps=1e-5)
    logits = b.linear(h, b.param("head.weight", (out, d)), name="logits")
    b.output("probs", b.softmax(logits))
    weights = {"embed.weight": R(vocab, d), "norm.weight": R(d), "head.weight": R(out, d)}
    return b.build(), weights


# ---------------------------------------------------------------- done-when: the toy graph runs
@pytest.mark.parametrize("bs,s", [(1, 1), (2, 7), (3, 4)])
def test_toy_graph_matches_plain_torch(bs, s):
    graph, w = toy()
    ids = torch.randint(0, 11, (bs, s), generator=G)
    got = run(graph, w, {"input_ids": ids})["probs"]
    x = w["embed.weight"][ids]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w["norm.weight"]
    want = torch.softmax(x @ w["head.weight"].T, dim=-1)
    assert got.shape == (bs, s, 5)
    assert ((got - want).norm() / want.norm()).item() <= 1e-6


# ---------------------------------------------------------------- builder
def test_builder_names_scopes_and_kinds():
    graph, _ = toy()
    assert [n.op for n in graph.nodes] == ["embed", "norm.rms", "linear", "softmax"]
    assert [v.name for n in graph.nodes for v in n.outputs] == ["h", "layer0.rms", "logits", "softmax"]
    assert {k: v.kind for k, v in graph.inputs.items()} == {
        "input_ids": "activation", "embed.weight": "param", "norm.weight": "param", "head.weight": "param"}
    assert list(graph.params()) == ["embed.weight", "norm.weight", "head.weight"]
    assert graph.nodes[1].out.type == tt(("B", "S", 8), "float32")
    assert graph.find("linear")[0].outputs[0] is graph.value("logits")


def test_builder_fresh_names_and_multi_outputs():
    b = GraphBuilder()
    x = b.input("x", ("N", 6), "float32")
    a, c = b.split(x, sizes=(2, 4))
    assert (a.name, c.name) == ("split.0", "split.1")
    y1, y2 = b.exp(a), b.exp(a)
    assert (y1.name, y2.name) == ("exp", "exp_0")
    vals, idx = b.topk(c, k=2, name="top")
    assert idx.dtype == "int64" and vals.name == "top.0"


def test_builder_params_and_cache_outputs():
    b = GraphBuilder(dtype="bfloat16")
    w = b.param("w", (4, 4))
    assert w.dtype == "bfloat16" and b.param("w", (4, 4)) is w
    with pytest.raises(ValueError, match="declared twice"):
        b.param("w", (4, 5))
    c = b.cache_input("kv", ("B", "T", 4))
    new = b.input("new", ("B", "S", 4), "bfloat16")
    b.output("kv.next", b.cache.append(c, new), cache_of=c)
    g = b.build()
    assert g.cache_map == {"kv": "kv.next"} and list(g.caches()) == ["kv"]
    assert g.outputs["kv.next"].type == tt(("B", "S+T", 4), "bf16")
    with pytest.raises(AttributeError, match="no op or op namespace 'nosuch'"):
        b.nosuch
    with pytest.raises(UnknownOpError, match="unknown op 'nope.x'"):
        b.op("nope.x", new)
    with pytest.raises(VerifyError, match="input name 'new' is already used"):
        b.input("new", (1,))
    with pytest.raises(VerifyError, match="kind must be one of"):
        g.add_input("z", tt((1,), "float32"), "weights")


def test_builder_rejects_non_values():
    b = GraphBuilder()
    with pytest.raises(ShapeError, match="is not a graph Value"):
        b.exp(torch.zeros(2))


# ---------------------------------------------------------------- editing API keeps use-def lists
def small():
    b = GraphBuilder("small")
    x = b.input("x", ("N", 4), "float32")
    y = b.exp(x, name="y")
    z = b.add(y, x, name="z")
    b.output("out", b.neg(z, name="w"))
    return b.build()


def test_replace_input_and_all_uses():
    g = small()
    x, y, z = g.value("x"), g.value("y"), g.value("z")
    add = z.node
    g.replace_input(add, 0, x)
    assert add.inputs == (x, x) and add not in y.users and add in x.users
    g.verify()
    with g.inserting_before(add):
        s = g.add_node("sigmoid", [x], names="s").out
    assert g.nodes.index(s.node) == g.nodes.index(add) - 1
    g.replace_all_uses(z, s)
    assert g.outputs["out"].node.inputs == (s,) and not z.users
    g.verify()
    with pytest.raises(VerifyError, match="cannot replace %s"):
        g.replace_all_uses(s, g.add_node("sum", [x], {"dims": (0,)}).out)


def test_replace_all_uses_rewires_graph_outputs():
    g = small()
    w = g.value("w")
    v = g.add_node("abs", [g.value("z")], names="v").out
    g.replace_all_uses(w, v)
    assert g.outputs["out"] is v
    g.erase_node(w.node)
    g.verify()


def test_erase_dce_and_unused_inputs():
    g = small()
    with pytest.raises(VerifyError, match="cannot erase exp defining %y: still used"):
        g.erase_node(g.value("y").node)
    p = g.add_input("p", tt((4,), "float32"), "param")
    g.add_node("mul", [g.value("x"), p], names="dead")
    assert g.eliminate_dead_code() == 1 and not p.users
    assert g.remove_unused_inputs() == ["p"] and "p" not in g.inputs
    with pytest.raises(VerifyError, match="cannot remove input %x: still used"):
        g.remove_input("x")
    g.verify()
    assert "dead" not in {v.name for v in g.values()}
    with pytest.raises(KeyError, match="no value %dead"):
        g.value("dead")


def test_copy_is_deep_and_networkx_view():
    g = small()
    c = g.copy()
    c.replace_input(c.nodes[1], 0, c.value("x"))
    assert g.nodes[1].inputs[0] is g.value("y")  # original untouched
    nx_g = to_networkx(g)
    assert nx_g.number_of_nodes() >= len(g.nodes)


def test_copy_equals_a_serialisation_round_trip_and_shares_nothing_mutable():
    import dsgraph.models as models

    from dsgraph.serialize import graph_to_json
    g = models.build_model("deepseek-v3-tiny", weights=False).graph
    g.nodes[3].meta["replaces"] = {0: "x"}
    c = g.copy()
    c.verify()
    assert graph_to_json(c) == graph_to_json(g) and str(c) == str(g)
    def mutable(gr):
        return {id(o) for n in gr.nodes for o in (n, n.meta, n.attrs, *n.outputs)} | {id(v) for v in gr.inputs.values()}

    assert not mutable(g) & mutable(c)
    c.nodes[3].meta["replaces"][0] = "y"
    assert g.nodes[3].meta["replaces"][0] == "x"


# ---------------------------------------------------------------- verify: one test per failure kind
def test_verify_use_before_def():
    g = small()
    g.nodes[0], g.nodes[1] = g.nodes[1], g.nodes[0]
    with pytest.raises(VerifyError, match=r"node 0 .*add.*input %y is used before it is defined"):
        g.verify()


def test_verify_value_from_another_graph():
    g, other = small(), small()
    g.replace_input(g.nodes[0], 0, other.value("x"))
    with pytest.raises(VerifyError, match="used before it is defined .*or from another graph"):
        g.verify()


def test_verify_duplicate_definition():
    g = small()
    g.nodes.append(g.nodes[0])  # the same node (and its output value) twice
    with pytest.raises(VerifyError, match="value %y is defined twice"):
        g.verify()
    g = small()
    g.nodes[1].outputs[0].name = "y"  # two values sharing a name
    with pytest.raises(VerifyError, match="name %y is used by two values"):
        g.verify()


def test_verify_wrong_output_type_after_edit():
    g = small()
    wide = g.add_input("wide", tt(("N", 8), "float32"))
    g.replace_input(g.value("y").node, 0, wide)  # exp now yields [N, 8] but %y says [N, 4]
    with pytest.raises(VerifyError, match=r"output %y has type float32\[N, 4\], rule gives float32\[N, 8\]"):
        g.verify()


def test_verify_type_rule_failure_after_edit():
    g = small()
    ints = g.add_input("ids", tt(("N", 4), "int64"))
    g.replace_input(g.value("z").node, 1, ints)
    with pytest.raises(VerifyError, match=r"add.*dtypes differ"):
        g.verify()


def test_verify_unknown_op():
    g = small()
    g.nodes[0].op = "exp_v2"
    with pytest.raises(VerifyError, match="unknown op 'exp_v2'"):
        g.verify()


def test_verify_bad_attrs():
    g = small()
    node = g.add_node("sum", [g.value("x")], {"dims": (0,)}, names="s")
    node.attrs["dims"] = [0]  # a list, not the normalised tuple
    with pytest.raises(VerifyError, match="attributes are not normalised"):
        g.verify()
    node.attrs = {"dims": (0,), "keepdim": False, "axis": 1}
    with pytest.raises(VerifyError, match=r"unknown attribute\(s\) \['axis'\]"):
        g.verify()
    node.attrs = {"dims": "0", "keepdim": False}
    with pytest.raises(VerifyError, match="attribute dims='0' should be tuple"):
        g.verify()


def test_verify_broken_use_def_lists():
    g = small()
    g.value("y").users.clear()
    with pytest.raises(VerifyError, match="use-def list of %y misses this node"):
        g.verify()
    g = small()
    g.value("x").users[g.value("w").node] = None  # a stray user
    with pytest.raises(VerifyError, match="use-def list of %x names a node that does not use it"):
        g.verify()


def test_verify_output_structure():
    g = small()
    g.nodes[0].outputs[0].index = 3
    with pytest.raises(VerifyError, match="does not point back at its node"):
        g.verify()
    g = small()
    g.set_output("ghost", Value("ghost", tt((1,), "float32"), Node("exp", (), {})))
    with pytest.raises(VerifyError, match="graph output 'ghost' refers to %ghost, which is not defined"):
        g.verify()
    g = small()
    g.nodes[0].outputs = ()
    with pytest.raises(VerifyError, match="has 0 outputs, op declares 1"):
        g.verify()


def test_verify_bad_cache_map():
    g = small()
    g.cache_map["x"] = "out"
    with pytest.raises(VerifyError, match="cache_map names 'x', which is not a cache input"):
        g.verify()
    g = small()
    g.add_input("kv", tt(("N", 4), "float32"), "cache")
    g.cache_map["kv"] = "kv.next"
    with pytest.raises(VerifyError, match="pairs 'kv' with output 'kv.next', which does not exist"):
        g.verify()


# ---------------------------------------------------------------- printer
def test_printer_text_form():
    g = small()
    assert str(g) == "\n".join([
        "graph small (",
        "  %x: float32[N, 4]  [activation]",
        ") {",
        "  %y = exp(%x) : float32[N, 4]",
        "  %z = add(%y, %x) : float32[N, 4]",
        "  %w = neg(%z) : float32[N, 4]",
        "  return out=%w",
        "}"])
    b = GraphBuilder()
    xs = [b.input(f"x{i}", (2,), "float32") for i in range(20)]
    line = b.graph.add_node("concat", xs, {"dim": 0}, names="cat").format(max_inputs=6)
    assert line == "%cat = concat(%x0, %x1, %x2, %x3, … 15 more, %x19) {dim=0} : float32[40]"


# ---------------------------------------------------------------- JSON
def rich_graph():
    """Attributes of every kind: tuples, nested tuples, symbols, inf, tiny floats, strings, bools, None."""
    b = GraphBuilder("rich", dtype="bfloat16")
    x = b.input("x", ("B", "S", 8), "float32")
    pos = b.input("pos", ("B", "S"))
    c = b.cache_input("kv", ("B", "T", 8), "float32")
    y = b.reshape(b.rope(b.reshape(x, shape=("B", "S", 2, 4)), pos, scaling="yarn", factor=40.0, mscale=0.707,
                         original_max_position_embeddings=4096, interleaved=True), shape=("B", "S", 8))
    y = b.where(b.lt(y, b.constant(value=0.1 + 0.2)), y, b.constant(value=float("-inf")))
    y = b.mul(y, b.constant(value=1e-20))
    b.output("kv.next", b.cache.append(c, y), cache_of=c)
    b.output("y", b.slice(y, dim=1, start=-1, end=None))
    g = b.build()
    g.meta["config"] = {"layers": 2, "name": "rich"}
    g.nodes[0].meta["origin"] = "x"
    return g


def test_json_round_trip_is_bit_exact():
    g = rich_graph()
    j = graph_to_json(g)
    j2 = json.loads(json.dumps(j))
    assert graph_to_json(graph_from_json(j2)) == j2 == json.loads(json.dumps(graph_to_json(graph_from_json(j))))
    g2 = graph_from_json(j2)
    g2.verify()
    assert str(g2) == str(g)
    assert g2.nodes[2].attrs["shape"] == ("B", "S", 8) and isinstance(g2.nodes[2].attrs["shape"], tuple)
    assert g2.find("constant")[0].attrs["value"] == 0.1 + 0.2
    ins = {"x": R(2, 3, 8), "pos": torch.randint(0, 100, (2, 3), generator=G), "kv": R(2, 4, 8)}
    a, b = run(g, {}, ins), run(g2, {}, ins)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_and_json_errors(tmp_path):
    g, w = toy()
    save_graph(g, tmp_path / "g.json")
    g2 = load_graph(tmp_path / "g.json")
    ids = torch.randint(0, 11, (2, 3), generator=G)
    assert torch.equal(run(g, w, {"input_ids": ids})["probs"], run(g2, w, {"input_ids": ids})["probs"])
    j = graph_to_json(g)
    with pytest.raises(VerifyError, match="not a dsgraph graph JSON"):
        graph_from_json({**j, "format": "onnx"})
    with pytest.raises(VerifyError, match="newer than this dsgraph"):
        graph_from_json({**j, "version": 99})
    bad = json.loads(json.dumps(j))
    bad["nodes"][0]["inputs"] = ["missing"]
    with pytest.raises(VerifyError, match="input %missing is not defined before use"):
        graph_from_json(bad)


# ---------------------------------------------------------------- interpreter checks
def test_interpreter_errors_name_the_culprit():
    g, w = toy()
    ids = torch.randint(0, 11, (2, 3), generator=G)
    with pytest.raises(InputError, match=r"needs inputs \['input_ids'\]"):
        run(g, w, {})
    with pytest.raises(InputError, match=r"has no inputs \['extra'\]"):
        run(g, w, {"input_ids": ids, "extra": ids})
    with pytest.raises(ShapeError, match="input %input_ids: expected dtype int64"):
        run(g, w, {"input_ids": ids.int()})
    with pytest.raises(CheckpointError, match="weight 'head.weight' is missing"):
        run(g, {k: v for k, v in w.items() if k != "head.weight"}, {"input_ids": ids})
    with pytest.raises(CheckpointError, match=r"has shape \(5, 7\), the graph expects \(5, 8\)"):
        run(g, {**w, "head.weight": R(5, 7)}, {"input_ids": ids})
    with pytest.raises(DSGraphError, match=r"while executing %h = embed\(%input_ids, %embed.weight\)"):
        run(g, w, {"input_ids": ids + 100})  # ids out of the vocabulary


def test_interpreter_binds_symbols_consistently_and_records():
    b = GraphBuilder()
    x, y = b.input("x", ("B", 4), "float32"), b.input("y", ("B", 4), "float32")
    b.output("s", b.add(x, y, name="s"))
    g = b.build()
    with pytest.raises(ShapeError, match="input %y: dim 0 is 3, expected B = 2"):
        run(g, {}, {"x": R(2, 4), "y": R(3, 4)})
    out, rec = Interpreter(g, {}).run({"x": R(2, 4), "y": R(2, 4)}, record=True)
    assert set(rec) == {"x", "y", "s"} and torch.equal(rec["s"], out["s"])


def test_split_graph_crosses_only_the_first_graphs_result():
    """What only the second graph reads moves there (the cross is `h`, not norm(h)); a value of positions alone,
    shared by both (as CSE leaves it), is recomputed by a second graph that reads positions itself instead of
    crossing; numerics are unchanged."""
    b = GraphBuilder()
    x, side = b.input("x", ("B", 4), "float32"), b.input("side", ("B", 4), "float32")
    pos = b.input("positions", ("B", 4))
    neg = b.neg(pos, name="negpos")
    h = b.exp(x, name="h")
    b.output("main", b.add(h, b.cast(neg, dtype="float32")))
    normed = b.norm.rms(h, b.param("w", (4,)), name="normed")
    branch = b.mul(b.add(normed, side), b.cast(neg, dtype="float32"))
    b.output("branch", b.add(branch, b.cast(pos, dtype="float32")))   # it reads positions itself, as rope does
    g = b.build()
    head, tail = split_graph(g, {"side"})
    assert [k for k in head.outputs if k.startswith(XFER)] == [XFER + "h"]
    assert {k for k, v in tail.inputs.items() if v.kind == "activation"} == {"side", "positions", "h"}
    feeds = {"x": R(2, 4), "positions": torch.arange(8).view(2, 4), "side": R(2, 4)}
    w = {"w": R(4)}
    whole, first = run(g, w, feeds), run(head, w, {k: feeds[k] for k in ("x", "positions")})
    second = run(tail, w, {"h": first[XFER + "h"], "side": feeds["side"], "positions": feeds["positions"]})
    assert torch.equal(first["main"], whole["main"]) and torch.equal(second["branch"], whole["branch"])
