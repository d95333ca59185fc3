"""DeepSeek-V4 tiny end to end on triton (CPU interpreter) and tvm (llvm) against eager: a 21-token prefill past
the window and several compression groups, decode steps after it, greedy tokens. The V4 ops without a Triton
lowering (V4_OPS: attention and the compressor) run as torch references, and the compile report names each; TVM
lowers them through their decompositions (also named in its report)."""
from __future__ import annotations

import pytest
import torch
from v4_fixtures import one_thread  # noqa: F401 (autouse fixture)

import dsgraph
from dsgraph.numerics import rel_err
from dsgraph.ops.moe import moe_experts_ref
from dsgraph.ops.v4_mix import swiglu_clamped_ref

V4_OPS = {"attention.sink", "indexer.slot_mask", "v4.compress"}
IDS = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def model():
    return dsgraph.load("deepseek-v4-tiny")


def _same_as_eager(exe, eager, tol):
    logits, state = exe.prefill(IDS[:, :17])
    ref, ref_state = eager.prefill(IDS[:, :17])
    assert rel_err(logits, ref) < tol
    for t in range(17, 21):    # decode steps cross a CSA group end (19) and an HCA one (23 not yet: 15 before)
        logits, state = exe.decode(IDS[:, t:t + 1], state)
        ref, ref_state = eager.decode(IDS[:, t:t + 1], ref_state)
        assert rel_err(logits, ref) < tol, t
    assert torch.equal(exe.generate(IDS[:1, :10], max_new_tokens=3), eager.generate(IDS[:1, :10], max_new_tokens=3))


def test_triton_matches_eager_with_reported_fallbacks(model):
    exe = dsgraph.compile(model, backend="triton", device="cpu")
    report = exe.compiled.report
    fallen = {k.op for k in report.fallbacks}
    assert fallen <= V4_OPS, fallen
    assert {"norm.rms", "linear", "embed", "linear.grouped", "cache.slide", "hc.pre", "hc.post", "hc.head",
            "moe.route_hash", "moe.route_sqrtsoftplus", "norm.rms_unweighted", "act.swiglu_clamped", "neg",
            "slice"} <= {k.op for k in report.kernels if k.kind != "fallback"}
    text = str(report)
    assert all(op in text for op in fallen)
    _same_as_eager(exe, dsgraph.compile(model, backend="eager"), 1e-5)


def test_tvm_llvm_matches_eager(model):
    pytest.importorskip("tvm")
    exe = dsgraph.compile(model, backend="tvm", device="cpu")
    assert "legalized without a TVM kernel" in exe.report() and "v4.compress" in exe.report()
    _same_as_eager(exe, dsgraph.compile(model, backend="eager"), 1e-4)


@pytest.mark.parametrize("limit", [None, 0.5])
@pytest.mark.parametrize("n", [6, 34])   # 34 tokens x top-2 over 4 experts: 17 rows an expert, a 32-row M tile
def test_fused_moe_template_clamped_swiglu(n, limit):
    pytest.importorskip("triton")
    from dsgraph.backends.triton.kernels.moe import fused_moe  # triton: only with the backend
    g = torch.Generator().manual_seed(n)
    e, k, d, i = 4, 2, 32, 32
    x, w = torch.randn(n, d, generator=g), torch.rand(n, k, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    gate, up, down = (torch.randn(e, a, b, generator=g) / 6 for a, b in ((i, d), (i, d), (d, i)))
    ffn = {} if limit is None else {"ffn": lambda t, a, b, c: swiglu_clamped_ref(t, a, b, c, limit=limit)}
    want = moe_experts_ref(x, w, ids, *[t for j in range(e) for t in (gate[j], up[j], down[j])], num_experts=e,
                           **ffn)
    assert rel_err(fused_moe(x, w, ids, torch.cat((gate, up), 1), down, limit=limit), want) < 1e-5
