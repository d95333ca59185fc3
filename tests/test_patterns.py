"""The pattern language and its rewrite engine."""
import pytest
import torch
from dsgraph.passes import ANY, P, Rewrite, Roots, Var, apply_rewrites, check, match, match_region

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


def test_a_name_used_twice_is_the_same_node():
    """Two outputs of one node under one name; two equal but distinct splits do not pass for one."""
    def graph(b, x, y):
        lo, _ = b.split(x, sizes=(2, 4), dim=-1)
        _, hi = b.split(x, sizes=(2, 4), dim=-1)
        b.output("o", b.concat(lo, hi, dim=-1))
    g = build(graph)
    same = P("concat", P("split", X, out=0, name="s"), P("split", X, out=1, name="s"), dim=-1)
    apart = P("concat", P("split", X, out=0, name="s"), P("split", X, out=1, name="t"), dim=-1)
    assert match(same, root(g, "concat"), g) is None
    m = match(apart, root(g, "concat"), g)
    assert m is not None and m.node("s") is not m.node("t")


def test_roots_match_several_nodes_that_share_a_value():
    def graph(b, x, y):
        b.output("s", b.sigmoid(x))
        b.output("u", b.silu(x))
        b.output("v", b.silu(y))
    g = build(graph)
    pair = Roots(P("sigmoid", X, name="s"), P("silu", X, name="u"))
    m = match(pair, root(g, "sigmoid"), g)
    assert m is not None and m["u"] is g.outputs["u"] and m.roots == (g.outputs["s"], g.outputs["u"])
    assert match(pair, root(g, "silu"), g) is None  # the first root is where the match is rooted
    assert match(Roots(P("sigmoid", X), P("sigmoid", X)), root(g, "sigmoid"), g) is None  # roots are distinct
    with pytest.raises(ValueError, match="shares no name"):
        Roots(P("sigmoid", X), P("silu", Y))


def test_a_two_root_rewrite_is_proven_and_reorders_what_it_must():
    """silu(x) read before sigmoid(x) is defined: silu -> x * sigmoid(x) moves its user after the sigmoid."""
    def graph(b, x, y):
        u = b.silu(x, name="u")
        early = b.mul(u, y, name="early")
        b.output("o", b.add(early, b.sigmoid(x, name="s")))
    g = build(graph)
    rw = Rewrite("silu_from_sigmoid", Roots(P("sigmoid", X, name="s"), P("silu", X, name="u")),
                 lambda b, m: {m["u"]: b.mul(m["x"], m["s"])})

    from dataclasses import dataclass

    import dsgraph.passes as passes

    @dataclass
    class SiluFromSigmoid(passes.Pass):
        name = "test_silu_from_sigmoid"
        description = "test-only: silu(x) -> x * sigmoid(x) where sigmoid(x) exists"

        def run(self, graph, weights):
            return apply_rewrites(graph, [rw])

    res = check(SiluFromSigmoid(), g, WeightStore())
    assert res.ok and res.changed, res.report()
    after = SiluFromSigmoid()(g, WeightStore()).graph
    assert [n.op for n in after.nodes] == ["sigmoid", "mul", "mul", "add"]


def test_match_region_climbs_from_the_first_node_to_the_root():
    """A backend claims exp -> neg -> add from the exp (its first node in graph order)."""
    region = P("add", P("neg", P("exp", X, name="e")), Y)
    g = build(lambda b, x, y: b.output("o", b.add(b.neg(b.exp(x)), y)))
    m = match_region(region, g.find("exp")[0], g, anchor="e")
    assert m is not None and m.root is g.find("add")[0] and len(m.nodes) == 3
    assert match_region(region, g.find("neg")[0], g, anchor="e") is None

    def shared(b, x, y):  # exp's value is a graph output too: not single-use, no region
        e = b.exp(x)
        b.output("o", b.add(b.neg(e), y))
        b.output("e", e)
    g2 = build(shared)
    assert match_region(region, g2.find("exp")[0], g2, anchor="e") is None
    with pytest.raises(ValueError, match="no sub-pattern named 'z'"):
        match_region(region, g.find("exp")[0], g, anchor="z")


def _cached():
    b = GraphBuilder("c")
    x = b.input("x", ("B", "S", 6), "float32")
    c = b.cache_input("c", ("B", "T", 6), "float32")
    b.output("c.next", b.cache.append(c, b.exp(x)), cache_of=c)
    return b.build()


def _swap_cache(decline):
    """cache c -> a fresh cache c2 of the same type (the verbs absorb_mla uses); optionally declines after."""
    def build_(b, m):
        c2 = b.cache_input("c2", m["c"].shape, m["c"].dtype)
        new = b.cache.append(c2, m["new"])
        b.retire_cache(m["c"])
        b.output("c2.next", new, cache_of=c2)
        return None if decline else {m.root_value: new}
    return Rewrite("swap", P("cache.append", Var("c", kind="cache", where=lambda v: v.name == "c"), Var("new")), build_)


def test_rewriter_verbs_edit_inputs_outputs_and_caches_and_roll_back():
    g = _cached()
    before = (str(g), dict(g.outputs), dict(g.cache_map), list(g.inputs))
    assert apply_rewrites(g, [_swap_cache(decline=True)]) == {"matched": 1, "rewritten": 0}
    assert (str(g), dict(g.outputs), dict(g.cache_map), list(g.inputs)) == before
    assert apply_rewrites(g, [_swap_cache(decline=False)])["rewritten"] == 1
    assert g.remove_unused_inputs(("cache",)) == ["c"]
    assert g.cache_map == {"c2": "c2.next"} and list(g.outputs) == ["c2.next"]
    assert g.outputs["c2.next"].node.inputs[0] is g.inputs["c2"]


def test_later_sweeps_visit_only_nodes_near_a_rewrite():
    """The worklist driver: after the first sweep, only the neighbourhood of a rewrite is matched again."""
    visits = []

    def graph(b, x, y):
        for i in range(8):
            b.output(f"s{i}", b.softmax(b.mul(x, y), dim=-1))
        b.output("o", b.neg(b.neg(b.neg(b.neg(y)))))
    g = build(graph)
    count = Rewrite("count", P("softmax", X, dim=lambda d: visits.append(d) and False), lambda b, m: None)
    negneg = Rewrite("negneg", P("neg", P("neg", X)), lambda b, m: {m.root_value: m["x"]})
    stats = apply_rewrites(g, [negneg, count])
    assert stats["negneg"] == 2 and not g.find("neg")
    assert len(visits) == 8  # the first sweep only: no softmax is near the negations
