"""The CUDA schedule step (backends/tvm/schedule.py), checked on the scheduled TIR: built for `cuda` without a GPU.

A decode projection must get dlight's GEMV schedule (LowBatchGEMV buckets, reduction across threads), not the
Matmul rule or the fallback, while one build still serves prefill (the Matmul branch); the report says which
rule each function got.
"""
import sys

import pytest
import torch

tvm = pytest.importorskip("tvm")

from dsgraph.backends import get_backend  # noqa: E402
from dsgraph.backends.tvm.build import make_target  # noqa: E402
from dsgraph.backends.tvm.deps import relax  # noqa: E402
from dsgraph.backends.tvm.prebuilt import export_prebuilt  # noqa: E402
from dsgraph.backends.tvm.schedule import GEMV_BUCKETS, Schedules  # noqa: E402
from dsgraph.backends.tvm.translate import translate  # noqa: E402

from dsgraph.builder import GraphBuilder  # noqa: E402
from dsgraph.interpreter import run as eager_run  # noqa: E402


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


def proj_graph(dtype: str):
    b = GraphBuilder(f"proj_{dtype}")
    x = b.input("x", ("B", "S", 256), dtype)
    b.output("y", b.linear(x, b.param("w", (96, 256), dtype), b.param("bias", (96,), dtype)))
    return b.build()


GPU_DTYPES = (("float32", 1e-5), ("bfloat16", 1e-2))


@pytest.mark.gpu
def test_linear_dispatch_gpu():
    """Every branch of the dispatch (M = 1, 3, 16, 37 rows) against the reference on the device. The device's TVM
    is runtime-only: build here first (`python tests/test_tvm_schedule.py DIR`), set $DSGRAPH_TVM_PREBUILT=DIR."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for dtype, tol in GPU_DTYPES:
        g = proj_graph(dtype)
        dt = getattr(torch, dtype)
        w = {"w": torch.randn(96, 256, device="cuda").to(dt), "bias": torch.randn(96, device="cuda").to(dt)}
        compiled = get_backend("tvm").compile(g, w, device="cuda")
        for b, s in ((1, 1), (3, 1), (4, 4), (1, 37)):
            inputs = {"x": torch.randn(b, s, 256, device="cuda").to(dt)}
            got, want = compiled.run(inputs)["y"].double(), eager_run(g, w, inputs)["y"].double()
            assert ((got - want).norm() / want.norm()).item() <= tol, (dtype, b, s)


if __name__ == "__main__":  # prebuild test_linear_dispatch_gpu's modules where TVM's compiler is
    for dtype, _ in GPU_DTYPES:
        print(export_prebuilt(proj_graph(dtype), "cuda", sys.argv[1]))
