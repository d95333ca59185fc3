"""Collective ops (type rules, one-process reference, simulated all-rank semantics against plain torch), the
multi-rank interpreter (subgroups included), ParallelPlan's refusals, and the shard pass proven against the
unsharded graph on every MoE / MLA / GQA tiny preset for TP, EP, TP+EP and DP-attention + EP, and TP groups
inside EP (tp=2, ep=4: with tokens replicated, and as tp 2 x dp 2 with DP attention)."""
import dsgraph.models as models
import dsgraph.passes as passes
import pytest
import torch
from dsgraph.passes.check_sharded import check_sharded
from dsgraph.passes.shard import shard_all

import dsgraph
from dsgraph import ConfigError, DSGraphError, GraphBuilder, ShapeError, TensorType, run
from dsgraph.multirank import MultiRankInterpreter
from dsgraph.ops.dist import SIMULATE
from dsgraph.parallel import ParallelPlan
from dsgraph.weights import WeightStore

G = torch.Generator().manual_seed(3)


def rand(*shape):
    return torch.randn(shape, generator=G)


def collective_graph(op, shape, **attrs):
    b = GraphBuilder(op)
    x = b.input("x", shape, "float32")
    b.output("y", b.op(op, x, group_size=2, **attrs))
    return b.build()


# ---------------------------------------------------------------- ops
def test_type_rules_in_terms_of_the_group_size():
    assert collective_graph("dist.all_gather", ("B", 3), dim=1).outputs["y"].type == TensorType(("B", 6), "float32")
    assert collective_graph("dist.reduce_scatter", (4, 6), dim=0).outputs["y"].shape == (2, 6)
    assert collective_graph("dist.all_reduce", ("B", 5)).outputs["y"].type == TensorType(("B", 5), "float32")
    with pytest.raises(ShapeError, match="does not split into 2 equal pieces"):
        collective_graph("dist.reduce_scatter", (3, 6), dim=0)
    b = GraphBuilder("a2a")
    x, counts = b.input("x", ("N", 4), "float32"), b.input("c", (3,), "int64")
    with pytest.raises(ShapeError, match=r"send_counts must be \[2\]"):
        b.op("dist.all_to_all", x, counts, group_size=2, rows="R")


def test_simulated_semantics_equal_plain_torch():
    xs = [rand(4, 6), rand(4, 6)]
    total = xs[0] + xs[1]
    assert all(torch.allclose(o[0], total) for o in SIMULATE["dist.all_reduce"]([[x] for x in xs], {}))
    gathered = SIMULATE["dist.all_gather"]([[x] for x in xs], {"dim": 1})
    assert all(torch.equal(o[0], torch.cat(xs, 1)) for o in gathered)
    scattered = SIMULATE["dist.reduce_scatter"]([[x] for x in xs], {"dim": 0, "group_size": 2})
    assert torch.allclose(torch.cat([o[0] for o in scattered]), total)
    counts = [torch.tensor([1, 3]), torch.tensor([4, 0])]
    out = SIMULATE["dist.all_to_all"]([[x, c] for x, c in zip(xs, counts)], {})
    assert torch.equal(out[0][0], torch.cat([xs[0][:1], xs[1][:4]])) and out[0][1].tolist() == [1, 4]
    assert torch.equal(out[1][0], xs[0][1:]) and out[1][1].tolist() == [3, 0]


def test_one_process_reference_needs_a_group_of_that_size():
    b = GraphBuilder("one")
    x = b.input("x", (2, 3), "float32")
    b.output("y", b.op("dist.all_reduce", x, group_size=1))
    t = rand(2, 3)
    assert torch.equal(run(b.build(), {}, {"x": t})["y"], t)
    with pytest.raises(DSGraphError, match="MultiRankInterpreter"):
        run(collective_graph("dist.all_reduce", (2, 3)), {}, {"x": t})


def test_multirank_interpreter_runs_a_subgroup_collective_per_block_of_ranks():
    xs = [rand(2, 3) for _ in range(4)]
    got = MultiRankInterpreter([collective_graph("dist.all_reduce", (2, 3))] * 4, [{}] * 4).run(
        [{"x": x} for x in xs])
    for r, out in enumerate(got):
        block = xs[r // 2 * 2: r // 2 * 2 + 2]
        assert torch.allclose(out["y"], block[0] + block[1])
    with pytest.raises(DSGraphError, match="do not tile"):
        MultiRankInterpreter([collective_graph("dist.all_reduce", (2, 3))] * 3, [{}] * 3)


def test_multirank_interpreter_refuses_ranks_that_do_not_line_up():
    with pytest.raises(DSGraphError, match="same collectives in the same order"):
        MultiRankInterpreter([collective_graph("dist.all_reduce", (2, 3)),
                              collective_graph("dist.all_gather", (2, 3), dim=0)], [{}, {}])


# ---------------------------------------------------------------- plans
def test_plans_are_printable_data_and_refuse_what_they_cannot_do():
    plan = ParallelPlan(tp=2, ep=2)
    assert str(plan) == "ParallelPlan(tp=2, ep=2, dp_attention=False)" and plan.world == 2
    assert plan.to_dict() == {"tp": 2, "ep": 2, "dp_attention": False}
    assert ParallelPlan(tp=2, ep=4).world == 4 and ParallelPlan(tp=2, ep=4, dp_attention=True).dp == 2
    with pytest.raises(ConfigError, match="ep must be 1 or the world size 4 and tp must divide it"):
        ParallelPlan(tp=4, ep=2)
    with pytest.raises(ConfigError, match="tp must divide"):
        ParallelPlan(tp=3, ep=4)
    with pytest.raises(ConfigError, match="dp_attention"):
        ParallelPlan(tp=2, dp_attention=True)


def test_a_plan_that_does_not_divide_names_the_dim_and_the_plan():
    m = models.build_model("deepseek-v3-tiny", weights=False)
    with pytest.raises(ConfigError, match=r"ParallelPlan\(tp=3.*num_attention_heads=4"):
        passes.get("shard", plan=ParallelPlan(tp=3))(m.graph, m.weights)
    with pytest.raises(ConfigError, match="n_routed_experts=8"):
        passes.get("shard", plan=ParallelPlan(ep=3))(m.graph, m.weights)
    dense = models.build_model("deepseek-llm-tiny", weights=False)
    with pytest.raises(ConfigError, match="needs a MoE model"):
        passes.get("shard", plan=ParallelPlan(ep=2))(dense.graph, dense.weights)


# ---------------------------------------------------------------- proofs
GQA = ["deepseek-llm-tiny", "deepseek-coder-tiny", "r1-distill-qwen-tiny", "r1-distill-llama-tiny"]
MOE = ["deepseek-moe-tiny", "deepseek-v2-lite-tiny", "deepseek-v2-tiny", "deepseek-v3-tiny", "deepseek-v3-fp8-tiny"]
CASES = ([(p, ParallelPlan(tp=2), []) for p in GQA]
         + [("deepseek-coder-tiny", ParallelPlan(tp=4), [])]  # 2 KV heads over 4 ranks: each kept twice
         + [(p, ParallelPlan(tp=2), []) for p in MOE]
         + [(p, ParallelPlan(ep=2), []) for p in MOE]
         + [(p, ParallelPlan(tp=2, ep=2), ["absorb_mla", "group_moe"]) for p in MOE if p != "deepseek-moe-tiny"]
         + [(p, ParallelPlan(ep=2, dp_attention=True), []) for p in MOE]
         + [("deepseek-v3-fp8-tiny", ParallelPlan(ep=2, dp_attention=True), ["absorb_mla", "group_moe"])]
         # TP groups of 2 inside EP 4: tokens replicated; tp 2 x dp 2 (top-3 slots split 1 + 2 by TP rank)
         + [(p, ParallelPlan(tp=2, ep=4), []) for p in ("deepseek-moe-tiny", "deepseek-v3-tiny")]
         + [(p, ParallelPlan(tp=2, ep=4, dp_attention=True), []) for p in ("deepseek-v2-lite-tiny",
                                                                            "deepseek-moe-tiny")]
         + [("deepseek-v3-fp8-tiny", ParallelPlan(tp=2, ep=4, dp_attention=True), ["absorb_mla", "group_moe"])])


@pytest.fixture(scope="module")
def built():
    cache = {}
    return lambda name: cache.setdefault(name, models.build_model(name, overrides={"num_hidden_layers": 2}))


@pytest.mark.parametrize("preset,plan,pipeline", CASES,
                         ids=lambda c: str(c) if not isinstance(c, list) else "+".join(c))
def test_sharded_graphs_equal_the_unsharded_one(built, preset, plan, pipeline):
    m = built(preset)
    res = check_sharded(m.graph, m.weights, plan, pipeline=pipeline, seq=3)
    assert res.ok, res.report()
    assert {"prefill:logits", "decode:logits"} <= set(res.errors)


def test_collectives_are_where_the_plan_puts_them(built):
    m = built("deepseek-v3-tiny")
    ops = {}
    for plan in (ParallelPlan(tp=2), ParallelPlan(ep=2), ParallelPlan(ep=2, dp_attention=True)):
        g, _ = shard_all(m.graph, m.weights, plan)[1]
        ops[str(plan)] = sorted({n.op for n in g.nodes if n.op.startswith("dist.")})
    assert ops == {str(ParallelPlan(tp=2)): ["dist.all_gather", "dist.all_reduce"],
                   str(ParallelPlan(ep=2)): ["dist.all_reduce"],
                   str(ParallelPlan(ep=2, dp_attention=True)): ["dist.all_to_all"]}
    groups = {}
    for plan in (ParallelPlan(tp=2, ep=4), ParallelPlan(tp=2, ep=4, dp_attention=True)):
        g, _ = shard_all(m.graph, m.weights, plan)[3]
        groups[str(plan)] = sorted({(n.op, n.attrs["group_size"]) for n in g.nodes if n.op.startswith("dist.")})
    assert groups == {str(ParallelPlan(tp=2, ep=4)): [("dist.all_gather", 2), ("dist.all_reduce", 2),
                                                      ("dist.all_reduce", 4)],
                      str(ParallelPlan(tp=2, ep=4, dp_attention=True)): [("dist.all_gather", 2),
                                                                          ("dist.all_reduce", 2),
                                                                          ("dist.all_to_all", 4)]}
    g, w = shard_all(m.graph, m.weights, ParallelPlan(tp=2))[1]
    spec = g.meta["shard"]["params"]["model.layers.0.self_attn.o_proj.weight"]
    assert spec == ["model.layers.0.self_attn.o_proj.weight", 1, 32, 64]
    assert torch.equal(w["model.layers.0.self_attn.o_proj.weight"],
                       m.weights["model.layers.0.self_attn.o_proj.weight"][:, 32:])


def test_a_wrong_rank_is_caught(built, monkeypatch):
    """The proof can fail: rank 1 holding rank 0's experts diverges."""
    m = built("deepseek-v3-tiny")
    real = shard_all

    def swapped(graph, weights, plan):
        ranks = real(graph, weights, plan)
        g1, w1 = ranks[1]
        for name in list(w1):
            if ".experts.4." in name:
                w1.set(name, weights[name.replace(".experts.4.", ".experts.0.")])
        return ranks

    monkeypatch.setattr("dsgraph.passes.check_sharded.shard_all", swapped)
    res = check_sharded(m.graph, m.weights, ParallelPlan(ep=2, dp_attention=True), seq=3)
    assert not res.ok


# ---------------------------------------------------------------- structure
def attention_block(heads, dim=8, head=4):
    """x -> q_proj -> heads -> merged -> o_proj, as the builder writes attention's projections."""
    b = GraphBuilder("block")
    x = b.input("x", ("B", "S", dim), "float32")
    q = b.linear(x, b.param("self_attn.q_proj.weight", (heads * head, dim)))
    o = b.reshape(b.reshape(q, shape=("B", "S", heads, head)), shape=("B", "S", heads * head))
    return b, b.linear(o, b.param("self_attn.o_proj.weight", (dim, heads * head)))


def test_tp_splits_columns_then_rows_with_one_all_reduce():
    b, y = attention_block(4)
    b.output("y", y)
    res = passes.get("shard", plan=ParallelPlan(tp=2), rank=1)(b.build(), WeightStore())
    want, y = attention_block(2)
    want.output("y", want.op("dist.all_reduce", y, group_size=2))
    passes.assert_structural_equal(res.graph, want.build())
    assert res.graph.meta["shard"]["params"] == {"self_attn.q_proj.weight": ["self_attn.q_proj.weight", 0, 8, 16],
                                                 "self_attn.o_proj.weight": ["self_attn.o_proj.weight", 1, 8, 16]}


def test_compiling_a_plan_without_its_ranks_says_how_to_launch():
    m = models.build_model("deepseek-v3-tiny", weights=False)
    with pytest.raises(ConfigError, match="needs 2 ranks, this process group has 1: launch with torchrun"):
        dsgraph.compile(m, parallel=ParallelPlan(tp=2))
