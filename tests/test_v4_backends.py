"""DeepSeek-V4 tiny end to end on triton (CPU interpreter) and tvm (llvm) against eager: a 21-token prefill past
the window and several compression groups, decode steps after it, greedy tokens. The V4 ops without a Triton
lowering run as torch references, and the compile report names each; TVM lowers them through their
decompositions (also named in its report)."""
from __future__ import annotations

import pytest
import torch
from v4_fixtures import one_thread  # noqa: F401 (autouse fixture)

import dsgraph
from dsgraph.numerics import rel_err

V4_OPS = {"attention.sink", "hc.head", "hc.post", "hc.pre", "indexer.slot_mask",
          "mlp.swiglu_clamped", "moe.experts_clamped", "moe.route_hash", "moe.route_sqrtsoftplus",
          "norm.rms_unweighted", "v4.compress", "neg", "sub", "act.swiglu_clamped"}
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
    assert fallen and fallen <= V4_OPS, fallen
    assert {"norm.rms", "linear", "embed", "linear.grouped", "cache.slide"} <= {k.op for k in report.kernels
                                                                              if k.kind != "fallback"}
    text = str(report)
    assert all(op in text for op in fallen)
    _same_as_eager(exe, dsgraph.compile(model, backend="eager"), 1e-5)


def test_tvm_llvm_matches_eager(model):
    pytest.importorskip("tvm")
    exe = dsgraph.compile(model, backend="tvm", device="cpu")
    assert "legalized without a TVM kernel" in exe.report() and "v4.compress" in exe.report()
    _same_as_eager(exe, dsgraph.compile(model, backend="eager"), 1e-4)
