"""The Triton backend end to end: lowering reports, small GraphBuilder graphs against the eager interpreter, and
every tiny model preset (prefill logits + a greedy decode step) against eager, on the CPU interpreter."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dsgraph.passes as passes  # noqa: E402
from dsgraph.backends import get_backend  # noqa: E402
from routing_helpers import decisive_routing  # noqa: E402

import dsgraph  # noqa: E402
from dsgraph import GraphBuilder, models  # noqa: E402
from dsgraph.errors import InputError, ShapeError  # noqa: E402
from dsgraph.interpreter import run  # noqa: E402

NOT_V4 = [p for p in models.TINY_PRESETS if p != "deepseek-v4-tiny"]

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out, ref):
    out, ref = out.float().cpu(), ref.float().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def _moe_graph(grouped: bool):
    """A router + per-expert MoE layer (optionally through the group_moe pass) with a residual add."""
    e, h, inter = 5, 24, 12
    b = GraphBuilder("moe", dtype="float32")
    x = b.input("x", ("N", h), "float32")
    w, idx = b.moe.gate(x, b.param("gate", (e, h)), top_k=2, scoring="softmax", norm_topk_prob=True)
    ws = []
    for j in range(e):
        ws += [b.param(f"e{j}.g", (inter, h)), b.param(f"e{j}.u", (inter, h)), b.param(f"e{j}.d", (h, inter))]
    b.output("y", b.add(b.moe.experts(x, w, idx, *ws, num_experts=e), x))
    g = b.build()
    gen = torch.Generator().manual_seed(0)
    weights = {v: torch.randn(t.type.concrete({}), generator=gen) / 4 for v, t in g.params().items()}
    if grouped:
        g, weights, _ = passes.run_pipeline(g, dsgraph.WeightStore(weights), ["group_moe"])
    return g, weights


@pytest.mark.parametrize("grouped", [False, True], ids=["per-expert+pipeline", "grouped-chain"])
@pytest.mark.parametrize("n", [1, 6])
def test_moe_layer_matches_eager(grouped, n):
    """The grouped chain group_moe emits is one fused-MoE region; the per-expert form gets there through the
    triton pipeline (the lowering stacks no experts itself)."""
    g, weights = _moe_graph(grouped)
    pipeline = [] if grouped else get_backend("triton").default_pipeline()
    fused, fused_weights, _ = passes.run_pipeline(g, dsgraph.WeightStore(weights), pipeline)
    compiled = get_backend("triton").compile(fused, fused_weights, device=DEV)
    x = torch.randn(n, 24)
    assert rel_err(compiled.run({"x": x})["y"], run(g, weights, {"x": x})["y"]) < 1e-5
    kinds = {k.op: k.kind for k in compiled.report.kernels}
    assert kinds["moe.gate"] == "template" and not compiled.report.fallbacks
    assert kinds["moe.permute+moe.grouped_gemm+act.swiglu+moe.unpermute"] == "template"


def test_unfused_forms_decline_naming_their_pass():
    """Expert stacking, gate|up concatenation and the FP8 GEMM live in their passes: without them the lowerings
    decline (a reported fallback) and say which pass to run."""
    g, weights = _moe_graph(grouped=False)
    b = GraphBuilder("unfused", dtype="float32")
    x = b.input("x", ("B", 32), "float32")
    w8 = b.dequant_fp8(b.param("w", (48, 32), "float8_e4m3fn"), b.param("s", (3, 2), "float32"), block=(16, 16))
    b.output("y", b.mlp.swiglu(b.linear(x, w8), b.param("g", (8, 48)), b.param("u", (8, 48)), b.param("d", (48, 8))))
    mlp = b.build()
    mlp_weights = {"w": torch.randn(48, 32).to(torch.float8_e4m3fn), "s": torch.rand(3, 2) + 0.5,
                   **{n: torch.randn(t.type.concrete({})) for n, t in mlp.params().items() if n not in ("w", "s")}}
    reasons = {k.op: k.note for graph, ws in ((g, weights), (mlp, mlp_weights))
               for k in get_backend("triton").compile(graph, ws, device=DEV).report.fallbacks}
    assert "run group_moe first" in reasons["moe.experts"]
    assert "run fuse_swiglu first" in reasons["mlp.swiglu"]
    assert "run fuse_fp8_linear first" in reasons["linear"]


def test_unlowered_op_is_a_reported_fallback():
    b = GraphBuilder("g", dtype="float32")
    x = b.input("x", ("B", 8), "float32")
    b.output("y", b.cumsum(x, dim=1))
    g = b.build()
    compiled = get_backend("triton").compile(g, {}, device=DEV)
    assert [k.op for k in compiled.report.fallbacks] == ["cumsum"]
    assert "fallbacks: 1 — cumsum" in str(compiled.report)
    x = torch.randn(3, 8)
    assert torch.allclose(compiled.run({"x": x})["y"].cpu(), torch.cumsum(x, 1))


def test_weight_only_subgraphs_fold_and_fp8_linear_uses_the_template():
    b = GraphBuilder("fp8", dtype="float32")
    x = b.input("x", ("B", 32), "float32")
    w = b.dequant_fp8(b.param("w", (48, 32), "float8_e4m3fn"), b.param("s", (3, 2), "float32"), block=(16, 16))
    b.output("y", b.linear(x, w))
    b.output("w2", b.mul(b.param("a", (4,)), b.param("a", (4,))))
    g = b.build()
    weights = {"w": torch.randn(48, 32).to(torch.float8_e4m3fn), "s": torch.rand(3, 2) + 0.5, "a": torch.randn(4)}
    fused, fused_weights, _ = passes.run_pipeline(g, dsgraph.WeightStore(weights), ["fuse_fp8_linear"])
    # w8a16 (the reference's numerics) on every device; w8a8 is held to its tolerance in the bf16 GPU test below
    compiled = get_backend("triton").compile(fused, fused_weights, device=DEV, fp8_act_quant=False)
    by_op = {k.op: k for k in compiled.report.kernels}
    assert by_op["linear_fp8"].kind == "template" and "fp8" in by_op["linear_fp8"].kernel
    assert by_op["mul"].kind == "reference" and "folded" in by_op["mul"].kernel
    assert "dequant_fp8" not in by_op  # the FP8 weight is never dequantised to a full copy
    x = torch.randn(5, 32)
    out, ref = compiled.run({"x": x}), run(g, weights, {"x": x})
    assert rel_err(out["y"], ref["y"]) < 1e-5 and torch.equal(out["w2"].cpu(), ref["w2"])


def test_inputs_are_checked_like_the_interpreter():
    b = GraphBuilder("g", dtype="float32")
    x = b.input("x", ("B", 8), "float32")
    b.output("y", b.norm.rms(x, b.param("w", (8,))))
    compiled = get_backend("triton").compile(b.build(), {"w": torch.ones(8)}, device=DEV)
    with pytest.raises(InputError, match="needs inputs"):
        compiled.run({})
    with pytest.raises(ShapeError, match="dim 1 is 9"):
        compiled.run({"x": torch.randn(2, 9)})
    with pytest.raises(ShapeError, match="dtype"):
        compiled.run({"x": torch.randn(2, 8, dtype=torch.float64)})


@pytest.mark.parametrize("preset", NOT_V4)   # V4 runs with reported fallbacks: tests/test_v4_backends.py
def test_tiny_preset_matches_eager(preset, **options):
    """Prefill logits and the greedy token of one decode step, through dsgraph.compile's Executable."""
    model = dsgraph.load(preset)
    # w8a16 FP8 GEMMs (the reference's numerics) on GPUs too: w8a8 is the bf16 test's, at its tolerance
    exe = dsgraph.compile(model, backend="triton", device=DEV, **{"fp8_act_quant": False, **options})
    eager = dsgraph.compile(model, backend="eager", device="cpu")
    assert not exe.compiled.report.fallbacks, str(exe.compiled.report)
    ids = torch.randint(0, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(1))
    logits, state = exe.prefill(ids)
    ref_logits, ref_state = eager.prefill(ids)
    assert rel_err(logits, ref_logits) < 1e-5
    tok = ref_logits[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(logits[:, -1].argmax(-1, keepdim=True).cpu(), tok)
    step, _ = exe.decode(tok.to(DEV), state)
    ref_step, _ = eager.decode(tok, ref_state)
    assert rel_err(step, ref_step) < 1e-5
    assert torch.equal(step[:, -1].argmax(-1).cpu(), ref_step[:, -1].argmax(-1))


def test_absorbed_mla_launches_no_concat():
    """fuse_mla_rows' ops: the query (W_UK absorb | RoPE) is one kernel the MLA decode kernel reads whole, and the
    cache row (RMSNorm of c_kv | RoPE of k_pe) one generated kernel that writes into the cache itself."""
    report = dsgraph.compile(dsgraph.load("deepseek-v2-lite-tiny"), backend="triton", device=DEV).compiled.report
    queries = [k for k in report.kernels if k.op == "mla.query_absorbed"]
    assert len(queries) == 3 and all(k.kernel.startswith("mla_query._mla_query_kernel") for k in queries)
    rows = [k for k in report.kernels if k.op == "mla.latent_row+cache.append"]
    assert len(rows) == 3 and all(k.kernel.startswith("mla_cache_row") for k in rows)
    assert not [k for k in report.kernels if k.op in ("concat", "rope", "cache.append")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the report of a machine without an sm_90 GPU")
def test_report_says_why_the_gluon_mla_kernel_is_off():
    """A model inside the Gluon kernel's shapes (64 heads, C=512, R=64) names the kernel's absence and why; one
    outside them (the tiny presets) gets no note."""
    model = models.build_model("deepseek-v3-tiny", mtp=False, overrides={
        "num_attention_heads": 64, "num_key_value_heads": 64, "kv_lora_rank": 512, "qk_rope_head_dim": 64})
    mla = [k.kernel for k in dsgraph.compile(model, backend="triton", device=DEV).compiled.report.kernels
           if "attention.mla_absorbed" in k.op]
    assert len(mla) == 3 and all("Gluon kernel off (needs an sm_90 GPU)" in k for k in mla)
    tiny = dsgraph.compile(dsgraph.load("deepseek-v3-tiny"), backend="triton", device=DEV).compiled.report
    assert "Gluon" not in str(tiny)


@pytest.mark.parametrize("preset", ["deepseek-v2-lite-tiny", "deepseek-v3-tiny"])
def test_folded_shared_experts_match_eager(preset):
    """group_moe(fold_shared_experts=True) in the triton pipeline: the shared experts' ids and weights, expanded to
    the run's token count, are columns the routing kernel writes (no concat launched), for prefill and decode."""
    folded = get_backend("triton").default_pipeline(group_moe={"fold_shared_experts": True})
    test_tiny_preset_matches_eager(preset, passes=folded)
    report = dsgraph.compile(dsgraph.load(preset), backend="triton", device=DEV, passes=folded).compiled.report
    gates = [k for k in report.kernels if k.op.startswith("moe.gate")]
    assert gates and all(k.op == "moe.gate+expand+concat" and "no concat" in k.note for k in gates)


@pytest.mark.parametrize("preset", ["deepseek-v2-lite-tiny", "deepseek-llm-tiny"])
def test_gemv_template_runs_the_few_row_projections(preset):
    """With option gemv every dense projection of a 4-token prefill and of a decode step takes the GEMV
    template (MLA's output absorb einsum too, one GEMV per head), and the model still matches eager."""
    test_tiny_preset_matches_eager(preset, gemv=True)
    report = str(dsgraph.compile(dsgraph.load(preset), backend="triton", device=DEV, gemv=True).compiled.report)
    assert "gemv._gemv_kernel" in report and "library    torch.nn.functional.linear" not in report
    assert ("gemv._gemv_kernel per head" in report) == preset.startswith("deepseek-v2")


# ---------------------------------------------------------------------------------------------------- GPU, bf16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _bf16_against_fp32(model, ids, **options):
    """Triton bf16 prefill + one decode step against eager fp32; the yardstick is eager's own bf16 error. Every
    kernel is first replayed against its op's reference on the kernel's own inputs, so a failure names it."""
    exe = dsgraph.compile(model, backend="triton", device="cuda", dtype="bfloat16", **options)
    assert not exe.compiled.report.fallbacks, str(exe.compiled.report)
    ids = ids.cuda()
    bad = exe.localize(ids)
    assert not bad, "kernels that disagree with their reference:\n" + "\n".join(map(str, bad[:8]))
    ref = dsgraph.compile(model, backend="eager", device="cuda", dtype="float32")
    eager16 = dsgraph.compile(model, backend="eager", device="cuda", dtype="bfloat16")
    (logits, state), (ref_logits, ref_state), (e16, _) = exe.prefill(ids), ref.prefill(ids), eager16.prefill(ids)
    tol = max(2e-2, 2 * rel_err(e16, ref_logits))
    assert rel_err(logits, ref_logits) < tol
    tok = ref_logits[:, -1].argmax(-1, keepdim=True)
    step, _ = exe.decode(tok, state)
    ref_step, _ = ref.decode(tok, ref_state)
    assert rel_err(step, ref_step) < tol


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("preset", models.TINY_PRESETS)
def test_tiny_preset_bf16_gpu(preset):
    """FP8 presets run w8a16 here (the linear_fp8 reference's numerics); w8a8 is checked on its own below."""
    model = decisive_routing(dsgraph.load(preset))
    _bf16_against_fp32(model, torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator()
                                            .manual_seed(2)), fp8_act_quant=False)


@pytest.mark.gpu
@needs_cuda
def test_fp8_w8a8_model_within_activation_quantisation_error_gpu():
    """DeepSeek's W8A8 numerics (the GPU default) add per-token-group activation rounding: e4m3 keeps 3 mantissa
    bits, so each GEMM is within a few percent of the dequantised-weight reference, and the logits too."""
    model = decisive_routing(dsgraph.load("deepseek-v3-fp8-tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2)).cuda()
    exe = dsgraph.compile(model, backend="triton", device="cuda", dtype="bfloat16")
    assert any("w8a8" in k.note for k in exe.compiled.report.kernels)
    ref = dsgraph.compile(model, backend="eager", device="cuda", dtype="float32")
    assert rel_err(exe(ids), ref(ids)) < 8e-2


@pytest.mark.gpu
@needs_cuda
def test_full_size_v2_lite_layers_bf16_gpu():
    """Two full-width DeepSeek-V2-Lite layers (one dense, one with 64 experts), real head and vocabulary sizes."""
    model = models.build_model("deepseek-v2-lite", mtp=False, weights_device="cuda", overrides={"num_hidden_layers": 2})
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(3))
    _bf16_against_fp32(model, ids)


def test_localize_names_the_broken_kernel():
    """dsgraph.app.check.localize replays each node on the backend's own inputs: a corrupted step is named, and
    the nodes after it (which see its wrong output as input) are not blamed."""
    model = dsgraph.load("deepseek-v3-tiny")
    exe = dsgraph.compile(model, backend="triton", device=DEV)
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    assert exe.localize(ids) == []
    victim = next(s for s in exe.compiled._run.steps if "attention" in s.label.split(" -> ")[0])
    good = victim.fn
    victim.fn = lambda a, sym: [t * 1.01 for t in good(a, sym)]
    bad = exe.localize(ids)
    assert len(bad) == 1 and victim.label.split(" -> ")[1].split(" ")[0] in bad[0].node, [str(b) for b in bad]
    assert bad[0].error == pytest.approx(0.01, rel=1e-3)


def test_localize_judges_a_fused_region_at_its_outputs():
    """fused_moe keeps its permuted rows and expert GEMM outputs to itself; the replay recomputes them from the
    region's inputs and weights, so a wrong fused kernel is still named (by the region's last node)."""
    model = dsgraph.load("deepseek-v3-tiny")
    exe = dsgraph.compile(model, backend="triton", device=DEV)
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    victim = next(s for s in exe.compiled._run.steps if "fused region" in s.label and "moe" in s.label)
    good = victim.fn
    victim.fn = lambda a, sym: [t * 1.02 for t in good(a, sym)]
    bad = exe.localize(ids)
    assert len(bad) == 1 and "moe.unpermute" in bad[0].node, [str(b) for b in bad]
    assert bad[0].error == pytest.approx(0.02, rel=1e-2)
