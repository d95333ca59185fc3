"""The TVM split-KV absorbed MLA (backends/tvm/lower/mla_split.py) against the op reference on llvm, over caches
spanning several chunks (a partial last one, causal chunks with no visible row), and its CUDA schedule built
here (no GPU: the CUDA source is checked, not run)."""
import sys

import pytest
import torch

pytest.importorskip("tvm")

from dsgraph.backends import get_backend  # noqa: E402
from dsgraph.backends.tvm.compiler import compile_program  # noqa: E402
from dsgraph.backends.tvm.env import unavailable_reason  # noqa: E402
from dsgraph.backends.tvm.lower.mla_split import CHUNK  # noqa: E402
from dsgraph.backends.tvm.prebuilt import export_prebuilt  # noqa: E402
from test_tvm_moe import cuda_source  # noqa: E402

from dsgraph.builder import GraphBuilder  # noqa: E402
from dsgraph.interpreter import run as eager_run  # noqa: E402

H, C, R = 3, 8, 3


def mla_graph(dtype: str):
    b = GraphBuilder(f"mla_{dtype}")
    q = b.input("q", ("B", "S", H, C + R), dtype)
    cache = b.input("cache", ("B", "T", C + R), dtype)
    b.output("causal", b.attention.mla_absorbed(q, cache, scale=0.3, kv_lora_rank=C))
    b.output("full", b.attention.mla_absorbed(q, cache, scale=0.3, kv_lora_rank=C, causal=False))
    return b.build()


def rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.fixture(scope="module", params=[("float32", 1e-5), ("float16", 2e-3)], ids=["fp32", "fp16"])
def built(request):
    dtype, tol = request.param
    g = mla_graph(dtype)
    return g, dtype, tol, get_backend("tvm").compile(g, {}, device="cpu")


@pytest.mark.parametrize("b,s,t", [(2, 1, 2 * CHUNK + 7), (1, 3, CHUNK + 1), (1, 1, 1)])
def test_split_kv_matches_reference(built, b, s, t):
    g, dtype, tol, compiled = built
    dt = getattr(torch, dtype)
    inputs = {"q": torch.randn(b, s, H, C + R).to(dt), "cache": torch.randn(b, t, C + R).to(dt)}
    got, want = compiled.run(inputs), eager_run(g, {}, inputs)
    for name in ("causal", "full"):
        assert got[name].dtype == want[name].dtype and rel(got[name], want[name]) <= tol, name


def test_split_kv_cuda_schedule():
    if unavailable_reason("cuda"):
        pytest.skip(unavailable_reason("cuda"))
    built = compile_program(mla_graph("bfloat16"), "cuda")
    assert any(n.startswith("schedule hand: split-KV MLA") for n in built.notes), built.notes
    src = cuda_source(built.executable)
    chunk = src[src.index("void __launch_bounds__(96) mla_absorbed_kernel("):]   # 3 heads x 32 lanes
    chunk = chunk[:chunk.index("\n}\n")]
    assert "__shared__" in chunk and "__shfl_down_sync" in chunk and "__syncthreads" in chunk
    assert "mla_absorbed_kernel_1(" in src    # the reduce over chunks, its own launch


@pytest.mark.gpu
def test_split_kv_gpu():
    """On the device, from modules built here (`python tests/test_tvm_mla.py DIR`, then $DSGRAPH_TVM_PREBUILT=DIR)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):
        g = mla_graph(dtype)
        compiled = get_backend("tvm").compile(g, {}, device="cuda")
        dt = getattr(torch, dtype)
        for b, s, t in ((2, 1, 2 * CHUNK + 7), (1, 3, CHUNK + 1), (3, 1, 300)):
            inputs = {"q": torch.randn(b, s, H, C + R, device="cuda").to(dt),
                      "cache": torch.randn(b, t, C + R, device="cuda").to(dt)}
            got, want = compiled.run(inputs), eager_run(g, {}, inputs)
            for name in ("causal", "full"):
                assert rel(got[name], want[name]) <= tol, (dtype, b, s, t, name)


if __name__ == "__main__":  # prebuild test_split_kv_gpu's modules where TVM's compiler is
    for dtype in ("float32", "bfloat16"):
        print(export_prebuilt(mla_graph(dtype), "cuda", sys.argv[1]))
