"""The CUDA schedule step (backends/tvm/schedule.py), checked on the scheduled TIR: built for `cuda` without a GPU.

A decode projection must get dlight's GEMV schedule (LowBatchGEMV buckets, reduction across threads), not the
Matmul rule or the fallback, while one build still serves prefill (the Matmul branch); the report says which
rule each function got.
"""
import pytest

tvm = pytest.importorskip("tvm")

from dsgraph.backends.tvm.build import make_target  # noqa: E402
from dsgraph.backends.tvm.deps import relax  # noqa: E402
from dsgraph.backends.tvm.schedule import GEMV_BUCKETS, Schedules  # noqa: E402
from dsgraph.backends.tvm.translate import translate  # noqa: E402

from dsgraph.builder import GraphBuilder  # noqa: E402


def fused(graph, target):
    t = relax.transform
    with target:
        return tvm.transform.Sequential([t.LegalizeOps(), t.AnnotateTIROpPattern(), t.FuseOps(), t.FuseTIR()])(
            translate(graph, target).mod)


def test_decode_linear_gets_the_gemv_schedule():
    b = GraphBuilder("proj")
    x = b.input("x", ("B", "S", 64), "bfloat16")
    b.output("y", b.linear(x, b.param("w", (96, 64), "bfloat16")))
    target = make_target("cuda")
    schedules = Schedules()
    with target:
        mod = schedules.apply(fused(b.build(), target), target)
    rule = schedules.chosen["linear"]
    assert rule.startswith("GEMV dispatch") and rule.endswith("else Matmul)"), rule
    text = mod["linear"].script()
    # one branch per bucket on the row count B*S, each a cross-thread (rfactor) GEMV; Matmul for the rest
    for bucket in GEMV_BUCKETS:
        assert f"T.tvm_thread_invariant(B * S <= T.int64({bucket}))" in text, bucket
    assert "NT_matmul_pad_rf" in text and 'thread="threadIdx.x"' in text
    assert any(n.startswith("schedule GEMV dispatch") and "linear" in n for n in schedules.notes())


def test_fp16_gemm_is_not_tensorized():
    """TVM 0.27's WMMA tensorization segfaults on fp16 GEMMs: they are marked so that Matmul skips it."""
    b = GraphBuilder("proj16")
    x = b.input("x", ("B", "S", 64), "float16")
    b.output("y", b.linear(x, b.param("w", (96, 64), "float16")))
    target = make_target("cuda")
    schedules = Schedules()
    with target:
        mod = schedules.apply(fused(b.build(), target), target)
    assert mod["linear"].attrs["dlight.do_not_tensorize"]
    assert schedules.chosen["linear"].startswith("GEMV dispatch")
