"""The planner reads its costs off the sharded graph: its per-step collective payload equals what the multi-rank
interpreter hands the collectives on the same step; memory and link figures follow the documented model; the
CLI prints a table; impossible layouts are refused."""
import pytest
import torch
from dsgraph.passes.check import make_inputs
from dsgraph.passes.check_sharded import shard_pipeline

from dsgraph import ConfigError, models
from dsgraph.app import cli
from dsgraph.app.plan import GPUS, _link_time, plan_model, rank_graph, step_cost
from dsgraph.multirank import MultiRankInterpreter
from dsgraph.parallel import ParallelPlan

NAME = "deepseek-v3-tiny"


@pytest.fixture(scope="module")
def model():
    return models.build_model(NAME, mtp=False, overrides={"num_hidden_layers": 2})


def measured_payload(model, plan, batch, seq):
    ranks = shard_pipeline(model.graph, model.weights, plan, ["absorb_mla"])
    multi = MultiRankInterpreter([g for g, _, _ in ranks], [w for _, w, _ in ranks])
    acts = make_inputs([model.graph], model.weights, batch, seq, 0, torch.Generator().manual_seed(0))
    local = batch // plan.dp
    feeds = []
    for r, (g, _, _) in enumerate(ranks):
        part = {k: t.chunk(plan.dp)[r // plan.tp % plan.dp] for k, t in acts.items() if k in g.inputs}
        caches = {n: torch.zeros(v.type.concrete({"B": local, "T": 0})) for n, v in g.caches().items()}
        feeds.append({**part, **caches})
    with torch.no_grad():
        multi.run(feeds)
    return dict(multi.moved)


@pytest.mark.parametrize("plan", [ParallelPlan(tp=2), ParallelPlan(tp=2, ep=2), ParallelPlan(tp=2, ep=4)])
def test_collective_payload_is_what_the_ranks_exchange(model, plan):
    g = rank_graph(model, plan)
    cost = step_cost(g, plan, model.config, GPUS["h200"], 1, batch=2, seq=5, context=5, fp8=False)
    assert cost.payload_bytes == measured_payload(model, plan, 2, 5)


def test_dispatch_payload_is_the_expected_rows(model):
    """all_to_all sends exactly the routed copies; what comes back depends on routing, so within a factor 2."""
    plan = ParallelPlan(ep=2, dp_attention=True)
    g = rank_graph(model, plan)
    want = step_cost(g, plan, model.config, GPUS["h200"], 1, batch=4, seq=5, context=5, fp8=False).payload_bytes
    got = measured_payload(model, plan, 4, 5)
    assert set(got) == set(want) == {"dist.all_to_all"}
    assert 0.5 <= got["dist.all_to_all"] / want["dist.all_to_all"] <= 2


def test_memory_and_links_follow_the_model(model):
    hw = GPUS["h200"]
    tp, dp = plan_model(NAME, 2, hw, batch=4, context=64, prefill=16, model=model,
                        plans=[ParallelPlan(tp=2), ParallelPlan(ep=2, dp_attention=True)])
    full = sum(v.type.nbytes({}) for v in model.graph.params().values())
    assert 0.5 * full < tp.weights_gib * 2**30 < 0.6 * full  # norms and the router stay whole
    assert dp.kv_gib == pytest.approx(tp.kv_gib / 2)  # each rank caches its own requests' latent, TP all of them
    moved, t = _link_time("dist.all_reduce", 1e9, 8, hw, 1)
    assert moved == pytest.approx(2 * 7 / 8 * 1e9) and t == pytest.approx(moved / 450e9 + 10e-6)
    _, t2 = _link_time("dist.all_reduce", 1e9, 16, hw, 2)
    assert t2 > 5 * t  # across nodes a ring runs at the InfiniBand rate


def test_cli_prints_a_table_and_refuses_impossible_layouts(capsys):
    assert cli.main(["plan", NAME, "--gpus", "2", "--batch", "4", "--context", "32", "--prefill", "8"]) == 0
    out = capsys.readouterr().out
    assert "decode tok/s" in out and out.count("ParallelPlan(") == 3
    assert cli.main(["plan", NAME, "--gpus", "16"]) == 2  # a user error: one line, exit 2 (cli_guard.py)
    assert "do not fit 1 node(s) of 8" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown --gpu"):
        cli.cmd_plan(cli.build_parser().parse_args(["plan", NAME, "--gpus", "2", "--gpu", "tpu"]))


def test_v4_is_planned_from_its_params_and_compact_cache(capsys):
    """V4 has no shard rules yet: sharding it is refused by name, and the planner sizes its plans by param role
    and V4's compact cache per layer type."""
    from dsgraph.app.plan_v4 import plan_v4
    m = models.build_model("deepseek-v4-tiny", weights=False, mtp=False)
    with pytest.raises(ConfigError, match="sharding DeepSeek-V4 graphs"):
        ParallelPlan(tp=2).check(m.graph.meta["config"], m.name)
    one, tp, dp = plan_v4("deepseek-v4-tiny", 2, GPUS["h200"], batch=4, context=64, prefill=16, model=m,
                          plans=[ParallelPlan(), ParallelPlan(tp=2), ParallelPlan(ep=2, dp_attention=True)])
    assert one.weights_gib * 2**30 == sum(v.type.nbytes({}) for v in m.graph.params().values())
    assert one.decode.payload_bytes == {} and set(dp.decode.payload_bytes) == {"dist.all_to_all"}
    assert 0.5 * one.weights_gib < tp.weights_gib < one.weights_gib and tp.kv_gib == one.kv_gib  # one KV head
    assert dp.kv_gib == pytest.approx(one.kv_gib / 2)
    assert cli.main(["plan", "deepseek-v4-tiny", "--gpus", "2", "--batch", "4", "--context", "32"]) == 0
    assert capsys.readouterr().out.count("ParallelPlan(") == 3
