"""Pass infrastructure: registry, purity, pipelines (records, dump, disable, failures), preconditions,
and the structural-equality helper."""
from dataclasses import dataclass

import dsgraph.passes as passes
import pytest
import torch
from dsgraph.backends import get_backend

from dsgraph import GraphBuilder, PassError, UnknownOpError, WeightStore, graph_to_json


def small_graph():
    b = GraphBuilder("small")
    x = b.input("x", ("B", 8), "float32")
    w = b.param("w", (8,))
    h = b.add(x, b.neg(x))
    dead = b.mul(x, x)  # noqa: F841  (unused on purpose)
    b.output("y", b.norm.rms(h, w, eps=1e-5))
    return b.build(), WeightStore({"w": torch.rand(8) + 0.5})


def test_registry_lists_every_pass_with_a_description():
    listed = passes.list_passes()
    for name in ("dce", "cse", "fold_constants", "prune_mtp", "legalize", "absorb_mla", "absorb_mla_premultiplied",
                 "group_moe", "fuse_add_rmsnorm", "fuse_swiglu", "fuse_router",
                 "merge_qkv_a", "merge_qkv", "fuse_fp8_linear"):
        assert name in listed and listed[name] and "\n" not in listed[name]
    assert passes.get("group_moe", fold_shared_experts=True).fold_shared_experts is True


def test_unknown_pass_and_bad_options_are_named():
    with pytest.raises(UnknownOpError, match="no_such_pass"):
        passes.get("no_such_pass")
    with pytest.raises(PassError, match="group_moe"):
        passes.get("group_moe", bogus=1)


def test_pass_leaves_its_input_untouched():
    g, w = small_graph()
    before = graph_to_json(g)
    res = passes.get("dce")(g, w)
    assert graph_to_json(g) == before and res.changed and res.graph is not g
    assert len(res.graph.nodes) == len(g.nodes) - 1


def test_pipeline_records_and_dump_after():
    g, w = small_graph()
    dumped = []
    g2, w2, records = passes.run_pipeline(g, w, ["cse", "fuse_add_rmsnorm", "dce"], dump_after="fuse_add_rmsnorm",
                                          out=dumped.append)
    assert [r.name for r in records] == ["cse", "fuse_add_rmsnorm", "dce"]
    fuse = records[1]
    assert fuse.changed and fuse.stats["rewritten"] == 1 and fuse.ops_delta == {"add": -1, "norm.rms": -1,
                                                                                 "norm.add_rms": 1}
    assert records[2].nodes_before - records[2].nodes_after == 1  # the dead mul
    assert len(dumped) == 1 and "norm.add_rms" in dumped[0] and "graph after fuse_add_rmsnorm" in dumped[0]
    assert "rewritten=1" in fuse.summary()


def test_pipeline_specs_disabled_and_default():
    g, w = small_graph()
    _, _, recs = passes.run_pipeline(g, w, ["cse", ("dce", {}), passes.get("fold_constants")], disabled=("cse",))
    assert [r.name for r in recs] == ["dce", "fold_constants"]
    assert passes.run_pipeline(g, w, "none")[2] == []
    _, _, recs = passes.run_pipeline(g, w, get_backend("triton").default_pipeline())
    assert [r.name for r in recs] == list(get_backend("triton").pipeline)
    with pytest.raises(PassError, match="backend"):
        passes.run_pipeline(g, w, "default")
    with pytest.raises(PassError, match="dump-after 'absorb_mla'"):
        passes.run_pipeline(g, w, ["dce"], dump_after="absorb_mla")


def test_default_pipeline_with_one_pass_optioned():
    """Options for a pass of the default list replace its name in place; a pass not in the list is an error."""
    plain = get_backend("triton").default_pipeline()
    folded = get_backend("triton").default_pipeline(group_moe={"fold_shared_experts": True})
    i = plain.index("group_moe")
    assert folded[i] == ("group_moe", {"fold_shared_experts": True})
    assert folded[:i] + folded[i + 1:] == plain[:i] + plain[i + 1:]
    assert passes.resolve(folded)[i].fold_shared_experts is True
    with pytest.raises(PassError, match="merge_qkv is not in it"):
        get_backend("tvm").default_pipeline(merge_qkv={})


@passes.register
@dataclass
class _BreaksTypes(passes.Pass):
    """Deliberately leaves an invalid graph (a node whose recorded type is wrong)."""

    name = "test_breaks_types"
    description = "test-only: corrupts a type"

    def run(self, graph, weights):
        v = graph.nodes[0].outputs[0]
        v.type = v.type.with_dtype("float16")
        return {"rewritten": 1}


def test_failure_names_the_pass_and_those_before():
    g, w = small_graph()
    with pytest.raises(PassError) as e:
        passes.run_pipeline(g, w, ["cse", "dce", "test_breaks_types"])
    msg = str(e.value)
    assert "test_breaks_types" in msg and "['cse', 'dce']" in msg and "rule gives" in msg


def test_preconditions_are_checked_and_explained():
    import dsgraph.models as models
    m = models.build_model("deepseek-v2-lite-tiny", mtp=False)
    with pytest.raises(PassError, match=r"needs absorb_mla first"):
        passes.run_pipeline(m.graph, m.weights, ["absorb_mla_premultiplied"])
    assert passes.info("absorb_mla_premultiplied").requires == ("absorb_mla",)


def test_structural_equal_ignores_names_but_not_structure():
    def build(names, eps=1e-5, share=True):
        b = GraphBuilder("g")
        x = b.input("x", ("B", 4), "float32")
        w = b.param("w", (4,))
        a = b.silu(x, name=names[0])
        c = b.silu(x, name=names[1]) if not share else a
        b.output("y", b.norm.rms(b.add(a, c, name=names[2]), w, eps=eps))
        return b.build()

    assert passes.structural_equal(build("abc"), build("xyz"))
    assert not passes.structural_equal(build("abc"), build("abc", eps=1e-6))
    assert not passes.structural_equal(build("abc"), build("abc", share=False))
    with pytest.raises(AssertionError, match="eps"):
        passes.assert_structural_equal(build("abc"), build("abc", eps=1e-6))
