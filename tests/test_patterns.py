"""The pattern language and its rewrite engine."""
import pytest
import torch
from dsgraph.passes import ANY, P, Rewrite, Var, apply_rewrites, check, match

from dsgraph import GraphBuilder, WeightStore, run

X, Y = Var("x"), Var("y")


def build(fn):
    b = GraphBuilder("t")
    x = b.input("x", ("B", 6), "float32")
    y = b.input("y", ("B", 6), "float32")
    fn(b, x, y)
    return b.build()


def root(graph, op):
    return graph.find(op)[-1].outputs[0]


def test_ops_attrs_and_predicates():
    g = build(lambda b, x, y: b.output("o", b.softmax(b.exp(x), dim=-1)))
    assert match(P("softmax", P("exp", X), dim=-1), root(g, "softmax"), g) is not None
    assert match(P("softmax", P("exp", X), dim=0), root(g, "softmax"), g) is None
    assert match(P("softmax", P("exp", X), dim=lambda d: d < 0), root(g, "softmax"), g) is not None
    assert match(P(("sigmoid", "softmax"), P("exp", X)), root(g, "softmax"), g) is not None
    assert match(P("softmax", P("log", X)), root(g, "softmax"), g) is None
    assert match(P("softmax", P("exp", X), nonexistent=ANY), root(g, "softmax"), g) is None


def test_same_binding_must_be_the_same_value():
    square = build(lambda b, x, y: b.output("o", b.mul(x, x)))
    product = build(lambda b, x, y: b.output("o", b.mul(x, y)))
    pat = P("mul", X, X)
    assert match(pat, root(square, "mul"), square)["x"] is square.inputs["x"]
    assert match(pat, root(product, "mul"), product) is None
    assert match(P("mul", X, Var("x", kind="param")), root(square, "mul"), square) is None


def test_commutative_matching_for_add_and_mul():
    g = build(lambda b, x, y: b.output("o", b.add(x, b.exp(y))))
    m = match(P("add", P("exp", Y), X), root(g, "add"), g)
    assert m is not None and m["x"] is g.inputs["x"] and m["y"] is g.inputs["y"]
    g2 = build(lambda b, x, y: b.output("o", b.sub(x, b.exp(y))))
    assert match(P("sub", P("exp", Y), X), root(g2, "sub"), g2) is None  # sub is not commutative


def test_single_use_interior_nodes():
    def two_users(b, x, y):
        e = b.exp(x)
        b.output("o", b.add(e, y))
        b.output("e", e)
    g = build(two_users)
    assert match(P("add", P("exp", X), Y), root(g, "add"), g) is None
    assert match(P("add", P("exp", X, single_use=False), Y), root(g, "add"), g) is not None


def test_rest_binds_variadic_inputs():
    g = build(lambda b, x, y: b.output("o", b.concat(x, y, x, dim=0)))
    m = match(P("concat", X, rest="more", dim=0), root(g, "concat"), g)
    assert m["more"] == (g.inputs["y"], g.inputs["x"])


def test_rewrite_to_fixpoint_rewires_and_removes_dead_nodes():
    """neg(neg(x)) -> x, applied until no double negation is left (four negs collapse to x)."""
    g = build(lambda b, x, y: b.output("o", b.add(b.neg(b.neg(b.neg(b.neg(x)))), y)))
    stats = apply_rewrites(g, [Rewrite("negneg", P("neg", P("neg", X)), lambda b, m: {m.root_value: m["x"]})])
    assert stats["rewritten"] == 2 and [n.op for n in g.nodes] == ["add"]
    assert g.nodes[0].inputs[0] is g.inputs["x"]


def test_declining_builder_rolls_back():
    g = build(lambda b, x, y: b.output("o", b.exp(x)))
    before = str(g)

    def build_then_decline(b, m):
        b.sigmoid(m["x"])
        return None

    stats = apply_rewrites(g, [Rewrite("no", P("exp", X), build_then_decline)])
    assert stats == {"matched": 1, "rewritten": 0} and str(g) == before


def test_replacing_an_interior_value_restores_topological_order_and_stamps_origin():
    """exp(x) has a second user placed between it and the root: the engine re-sorts after rewiring."""
    def graph(b, x, y):
        e = b.exp(x, name="e")
        side = b.mul(e, y, name="side")
        b.output("o", b.add(b.sigmoid(e), side))
    g = build(graph)
    w = WeightStore()
    inputs = {"x": torch.randn(3, 6), "y": torch.randn(3, 6)}
    ref = run(g, w, inputs)["o"]

    def fuse(b, m):  # replace both exp and sigmoid(exp) with values built before the root
        e2 = b.exp(m["x"])
        return {m["e"]: e2, m.root_value: b.sigmoid(b.add(e2, b.constant(value=0.0)))}

    rw = Rewrite("sig_exp", P("sigmoid", P("exp", X, name="e", single_use=False)), fuse)
    stats = apply_rewrites(g, [rw])
    assert stats["rewritten"] == 1
    torch.testing.assert_close(run(g, w, inputs)["o"], ref)
    new = [n for n in g.nodes if n.op in ("exp", "sigmoid")]
    assert {n.meta["replaces"]["0"] for n in new} == {"e", "sigmoid"}
    assert {n.meta["origin"] for n in new} == {"sigmoid"}  # the root each was built for


def test_a_rewrite_that_rebuilds_its_own_pattern_is_stopped():
    g = build(lambda b, x, y: b.output("o", b.exp(x)))
    with pytest.raises(Exception, match="fixpoint"):
        apply_rewrites(g, [Rewrite("loop", P("exp", X), lambda b, m: {m.root_value: b.exp(m["x"])})], max_rounds=5)


def test_multi_output_and_harness_on_a_pattern_pass():
    """A split whose two halves are re-concatenated in order is the identity."""
    def graph(b, x, y):
        lo, hi = b.split(x, sizes=(2, 4), dim=-1)
        b.output("o", b.add(b.concat(lo, hi, dim=-1), y))
    g = build(graph)
    pat = P("concat", P("split", X, out=0, name="lo"), P("split", X, out=1), dim=-1)

    def same_split(b, m):
        return {m.root_value: m["x"]} if m.node("lo").attrs["dim"] in (-1, 1) else None

    from dataclasses import dataclass

    import dsgraph.passes as passes
    @dataclass
    class Unsplit(passes.Pass):
        name = "test_unsplit"
        description = "test-only: concat(split(x)) -> x"

        def run(self, graph, weights):
            return apply_rewrites(graph, [Rewrite("unsplit", pat, same_split)])

    res = check(Unsplit(), g, WeightStore())
    assert res.ok and res.changed and res.records[0].nodes_after == 1, res.report()
