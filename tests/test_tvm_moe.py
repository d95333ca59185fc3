"""The TVM grouped GEMM over tiles of expert-sorted rows (backends/tvm/lower/moe_tiles.py) against the op
references on llvm, and its CUDA schedules built (no GPU here: the CUDA source is checked, not run).

Routings cover the edge cases: every token to one expert (several tiles, a partial last one), one token,
top-k equal to the number of experts, and experts with no tokens (random routing with few tokens).
"""
import sys

import pytest
import torch

pytest.importorskip("tvm")

from dsgraph.backends import get_backend  # noqa: E402
from dsgraph.backends.tvm.compiler import compile_program  # noqa: E402
from dsgraph.backends.tvm.env import unavailable_reason  # noqa: E402
from dsgraph.backends.tvm.lower.moe_tiles import TILE_ROWS  # noqa: E402
from dsgraph.backends.tvm.prebuilt import export_prebuilt  # noqa: E402

from dsgraph.builder import GraphBuilder  # noqa: E402
from dsgraph.interpreter import run as eager_run  # noqa: E402

E, K, N = 4, 24, 20


def moe_graph(dtype: str, k: int):
    b = GraphBuilder("grouped")
    x = b.input("x", ("T", K), dtype)
    idx = b.input("idx", ("T", k), "int64")
    xp, _, offsets = b.moe.permute(x, idx, num_experts=E)
    b.output("offsets", offsets)
    b.output("y", b.moe.grouped_gemm(xp, b.param("w", (E, N, K), dtype), offsets))
    return b.build()


@pytest.fixture(scope="module", params=[("float32", 1e-5), ("float16", 2e-3)], ids=["fp32", "fp16"])
def built(request):
    dtype, tol = request.param
    graphs = {}
    for k in (2, E):
        g = moe_graph(dtype, k)
        w = {"w": torch.randn(E, N, K).to(getattr(torch, dtype))}
        graphs[k] = (g, w, get_backend("tvm").compile(g, w, device="cpu"))
    return dtype, tol, graphs


def routing(case: str, t: int, k: int):
    if case == "one_expert":  # every slot of every token on expert 1: several tiles, the last one partial
        return torch.full((t, k), 1, dtype=torch.int64)
    if case == "all_experts":
        return torch.stack([torch.randperm(E) for _ in range(t)])[:, :k]
    return torch.stack([torch.randperm(E)[:k] for _ in range(t)])


@pytest.mark.parametrize("case,t,k", [("one_expert", 2 * TILE_ROWS + 5, 2), ("random", 1, 2), ("random", 3, 2),
                                      ("all_experts", 9, E)])
def test_grouped_gemm_matches_reference(built, case, t, k):
    dtype, tol, graphs = built
    g, w, compiled = graphs[k]
    inputs = {"x": torch.randn(t, K).to(getattr(torch, dtype)), "idx": routing(case, t, k)}
    got, want = compiled.run(inputs), eager_run(g, w, inputs)
    assert torch.equal(got["offsets"], want["offsets"])
    err = ((got["y"].double() - want["y"].double()).norm() / want["y"].double().norm()).item()
    assert got["y"].dtype == want["y"].dtype and err <= tol, err


def cuda_source(executable) -> str:
    """The CUDA C of a built VM executable (the first imported module of kind cuda)."""
    todo = list(executable.mod.imports)
    while todo:
        mod = todo.pop()
        if mod.kind == "cuda":
            return mod.inspect_source()
        todo += list(mod.imports)
    raise AssertionError("no cuda module in the build")


def test_grouped_gemm_cuda_schedules():
    """Built for sm_90 here (nvcc, no GPU): both hand schedules, one launch each behind the branch on M."""
    if unavailable_reason("cuda"):
        pytest.skip(unavailable_reason("cuda"))
    built = compile_program(moe_graph("bfloat16", 2), "cuda")
    assert any(n.startswith("schedule hand: grouped GEMM") and "moe_grouped_gemm" in n for n in built.notes)
    src = cuda_source(built.executable)
    heads = [line for line in src.splitlines() if "__global__" in line and "moe_grouped_gemm_kernel" in line
             and line.endswith("{")]
    bodies = [src[src.index(h):src.index("\n}\n", src.index(h))] for h in heads]
    assert any("__shfl_down_sync" in b and "__shared__" not in b for b in bodies)   # decode: lanes over K
    assert any("w_shared" in b and "__syncthreads" in b for b in bodies)            # tiles: weights in smem


GPU_DTYPES = (("float32", 1e-5), ("bfloat16", 1e-2))


@pytest.mark.gpu
def test_grouped_gemm_gpu():
    """The CUDA schedules against the reference on the device, both branches (M <= E and M > E). The device's TVM
    is runtime-only: build the modules here first (`python tests/test_tvm_moe.py DIR`) and set
    $DSGRAPH_TVM_PREBUILT=DIR there."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for dtype, tol in GPU_DTYPES:
        g = moe_graph(dtype, 2)
        w = {"w": torch.randn(E, N, K, device="cuda").to(getattr(torch, dtype))}
        compiled = get_backend("tvm").compile(g, w, device="cuda")
        for case, t in (("random", 1), ("one_expert", 2 * TILE_ROWS + 5), ("random", 40)):
            x = torch.randn(t, K, device="cuda").to(getattr(torch, dtype))
            inputs = {"x": x, "idx": routing(case, t, 2).cuda()}
            got, want = compiled.run(inputs), eager_run(g, w, inputs)
            err = ((got["y"].double() - want["y"].double()).norm() / want["y"].double().norm()).item()
            assert err <= tol, (dtype, case, t, err)


if __name__ == "__main__":  # prebuild test_grouped_gemm_gpu's modules where TVM's compiler is
    for dtype, _ in GPU_DTYPES:
        print(export_prebuilt(moe_graph(dtype, 2), "cuda", sys.argv[1]))
