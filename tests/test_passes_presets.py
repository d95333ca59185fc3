"""Every registered pass, proven by the harness on every tiny preset (prefill and a cached decode step);
absorption shrinks the KV cache as computed; deliberately wrong passes are caught with the node named."""
from dataclasses import dataclass

import dsgraph.models as models
import dsgraph.passes as passes
import pytest
import torch
from dsgraph.passes import ANY, P, Rewrite, Var, apply_rewrites

import dsgraph

PRESETS = models.TINY_PRESETS


@pytest.fixture(scope="module", params=PRESETS)
def model(request):
    return models.build_model(request.param)


# options under which a pass must preserve values: retype proven by lossless widening (its bf16 default changes
# values by design; tests/test_retype.py proves that graph equals the one built in bf16)
PROOF_OPTIONS = {"retype": {"dtype": "float64"}}


def pipeline_for(name):
    return list(passes.info(name).requires) + [(name, PROOF_OPTIONS[name]) if name in PROOF_OPTIONS else name]


def must_change(name, cfg, graph):
    """Where each pass has something to do (so a pass that silently matches nothing fails)."""
    ops = {n.op for n in graph.nodes}
    if cfg.family == "v4":   # no MLA, q/k/v, add+norm or V3 router: those passes decline
        declines = ("absorb_mla", "absorb_mla_premultiplied", "fuse_router", "fuse_add_rmsnorm",
                    "merge_qkv_a", "merge_qkv", "fuse_rope_attention", "fuse_mla_rows")
        return False if name in declines else {"legalize": True, "group_moe": True,
                                               "fuse_swiglu": "mlp.swiglu_clamped" in ops,
                                               "prune_mtp": "mtp_ids" in graph.inputs,
                                               "fuse_fp8_linear": "dequant_fp8" in ops}.get(name)
    return {
        "absorb_mla": cfg.is_mla, "absorb_mla_premultiplied": cfg.is_mla, "group_moe": cfg.is_moe,
        "fuse_router": cfg.is_moe, "fuse_add_rmsnorm": True, "fuse_swiglu": True, "legalize": True,
        "merge_qkv_a": cfg.is_mla, "merge_qkv": not cfg.is_mla, "prune_mtp": "mtp_ids" in graph.inputs,
        "fuse_fp8_linear": "dequant_fp8" in ops,
        "fuse_rope_attention": True, "fuse_mla_rows": cfg.is_mla,
    }.get(name)


@pytest.mark.parametrize("name", sorted(n for n in passes.list_passes() if not n.startswith("test_")))
def test_every_pass_on_every_preset(model, name):
    if getattr(passes.info(name).factory, "tolerance", None):
        pytest.skip("a lossy pass: proven on one layer of every MLA preset, where no routing choice can flip "
                    "(tests/test_fp8_kv_cache.py)")
    res = passes.check(pipeline_for(name), model.graph, model.weights, seq=4)
    assert res.ok, res.report()
    assert any(k.startswith("decode:") for k in res.errors), "the cached decode step was not compared"
    expected = must_change(name, model.config, model.graph)
    if expected is not None:
        assert res.changed == expected, f"{name} on {model.name}: changed={res.changed}, expected {expected}"


def test_group_moe_with_folded_shared_experts(model):
    if not model.config.is_moe:
        pytest.skip("dense model")
    res = passes.check([("group_moe", {"fold_shared_experts": True})], model.graph, model.weights, seq=4)
    assert res.ok and res.changed, res.report()


@pytest.mark.parametrize("preset", [p for p in PRESETS if models.build_model(p, weights=False).config.is_mla])
def test_absorption_shrinks_the_kv_cache_as_computed(preset):
    m = models.build_model(preset)
    c = m.config
    layers = c.num_hidden_layers + ("mtp_ids" in m.graph.inputs)
    index = layers * (c.index_head_dim or 0)   # V3.2's indexer key cache, which absorption leaves as it is
    before = m.graph.summary().kv_values_per_token
    assert before == layers * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) + index
    for spec in (["absorb_mla"], ["absorb_mla", "absorb_mla_premultiplied"]):
        g, _, _ = passes.run_pipeline(m.graph, m.weights, spec)
        assert g.summary().kv_values_per_token == layers * (c.kv_lora_rank + c.qk_rope_head_dim) + index
        assert all(v.type.rank == 3 for v in g.caches().values()) and len(g.caches()) == layers * (1 + c.is_dsa)


def test_full_size_model_is_rewritten_without_weights():
    """Weight transforms are lazy: a 15.7B-parameter graph is rewritten without materialising anything."""
    m = models.build_model("deepseek-v2-lite", weights=False)
    g, w, _ = passes.run_pipeline(m.graph, m.weights, ["absorb_mla", "group_moe"])
    assert g.summary().kv_values_per_token == 27 * (512 + 64)
    assert m.graph.summary().kv_values_per_token == 27 * 16 * (192 + 128)
    assert w.is_lazy("model.layers.3.mlp.experts.gate_up_proj.weight") and w.is_lazy(
        "model.layers.0.self_attn.kv_b_proj.w_uk")
    with pytest.raises(dsgraph.CheckpointError, match="kv_b_proj.weight"):
        w["model.layers.0.self_attn.kv_b_proj.w_uk"]


def test_compiled_with_passes_generates_the_same_tokens():
    m = models.build_model("deepseek-v3-tiny")
    prompt = torch.randint(0, m.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    ref = dsgraph.compile(m, backend="eager", passes="none").generate(prompt, max_new_tokens=4)
    exe = dsgraph.compile(m, backend="eager", passes=["absorb_mla", "fuse_router", "group_moe", "fuse_add_rmsnorm"])
    assert torch.equal(exe.generate(prompt, max_new_tokens=4), ref)
    assert "cache.0.latent" in exe.graph.inputs


@pytest.mark.parametrize("preset,spec", [("deepseek-llm-tiny", ["fuse_add_rmsnorm", "fuse_swiglu", "legalize"]),
                                         ("deepseek-v2-lite-tiny", ["absorb_mla", "absorb_mla_premultiplied"])])
def test_bf16_within_bf16_tolerance(preset, spec):
    m = models.build_model(preset, dtype="bfloat16")
    res = passes.check(spec, m.graph, m.weights, seq=4)
    assert res.ok and res.rtol == 2e-2, res.report()


# --- deliberately wrong passes ---------------------------------------------------------------------

@dataclass
class ForgetsResidual(passes.Pass):
    """Wrong: fuses add + RMSNorm but hands the un-added input on as the residual."""

    name = "test_forgets_residual"
    description = "test-only: a wrong add+rms fusion"

    def run(self, graph, weights):
        def build(b, m):
            normed, _ = b.norm.add_rms(m["x"], m["r"], m["w"], eps=m.attr("eps"))
            return {m.root_value: normed, m["sum"]: m["x"]}
        pat = P("norm.rms", P("add", Var("x"), Var("r"), name="sum", single_use=False), Var("w"), eps=ANY)
        return apply_rewrites(graph, [Rewrite("bad", pat, build)])


@dataclass
class WrongEps(passes.Pass):
    """Wrong: rebuilds every RMSNorm with a much larger epsilon."""

    name = "test_wrong_eps"
    description = "test-only: a wrong RMSNorm rewrite"

    def run(self, graph, weights):
        pat = P("norm.rms", Var("x"), Var("w"), eps=lambda e: e < 1e-3)
        return apply_rewrites(graph, [Rewrite("eps", pat, lambda b, m: {
            m.root_value: b.norm.rms(m["x"], m["w"], eps=m.attr("eps") * 1e4)})])


def test_a_wrong_pass_is_caught_with_the_diverging_node_named():
    m = models.build_model("deepseek-v3-tiny")
    res = passes.check(ForgetsResidual(), m.graph, m.weights, seq=4)
    assert not res.ok and res.changed
    # layer 0's sums were replaced by their un-added inputs, so layer 1's fused norm is the first node
    # computing something else: it adds the MLP output to the embedding instead of to the residual stream
    assert res.first_divergence.startswith("[prefill] %L1.rms"), res.report()
    assert "norm.add_rms(%embed, %L0.swiglu" in res.first_divergence
    assert "(replaces %L1.rms of the original)" in res.first_divergence
    with pytest.raises(dsgraph.PassError, match="first diverging node: .*replaces %L1.rms"):
        res.raise_if_failed()


def test_a_wrong_replacement_is_named_through_its_origin():
    m = models.build_model("deepseek-llm-tiny")
    res = passes.check(WrongEps(), m.graph, m.weights, seq=4)
    assert not res.ok
    assert "norm.rms(%L0.h" not in res.first_divergence  # the new node, not an original one
    assert "(replaces %L0.rms of the original)" in res.first_divergence, res.report()


ATTENTION = ("attention.gqa", "attention.mla", "attention.mla_absorbed", "attention.mla_sparse",
             "attention.mla_sparse_absorbed")


@pytest.mark.parametrize("first", [[], ["absorb_mla"]])
def test_rope_folds_into_every_attention(model, first):
    """Naive, absorbed and GQA attention alike: no attention op is left reading a separately rotated query, the
    proof harness passes, and a backend without a kernel for attention.with_rope gets it decomposed back."""
    if model.config.family == "v4":
        pytest.skip("V4 rotates a tail slice of q and of the shared K = V and un-rotates the output: "
                    "fuse_rope_attention declines attention.sink (test_every_pass_on_every_preset)")
    pipeline = first + ["fuse_rope_attention"]
    graph, _, _ = passes.run_pipeline(model.graph, model.weights, pipeline, out=lambda *a: None)
    before = sum(n.op in ATTENTION for n in passes.run_pipeline(model.graph, model.weights, first,
                                                                 out=lambda *a: None)[0].nodes)
    assert sum(n.op == "attention.with_rope" for n in graph.nodes) == before > 0
    assert not any(n.op in ATTENTION for n in graph.nodes)
    res = passes.check(pipeline + ["legalize"], model.graph, model.weights, seq=4)
    assert res.ok, res.report()
