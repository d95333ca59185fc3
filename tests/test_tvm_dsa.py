"""The TVM lowerings of the DSA ops (backends/tvm/lower/dsa.py) on llvm against the eager references: one graph over
symbolic B, S, T (so one build serves T below and above the top-k), run on fresh random inputs; no fallback."""
import pytest
import torch

tvm = pytest.importorskip("tvm")

from dsgraph.builder import GraphBuilder  # noqa: E402
from tests.test_tvm_ops import check, compile_tvm  # noqa: E402

G = torch.Generator().manual_seed(5)
K, H, D, C, R = 3, 4, 8, 12, 4


@pytest.fixture(scope="module")
def dsa():
    """LayerNorm of the keys, indexer scores, top-k and sparse absorbed MLA chained as in a V3.2 layer."""
    b = GraphBuilder("dsa")
    q = b.input("q", ("B", "S", H, D), "float32")
    keys = b.input("k", ("B", "T", D), "float32")
    w = b.input("w", ("B", "S", H), "float32")
    lat_q, cache = b.input("lq", ("B", "S", 2, C + R), "float32"), b.input("c", ("B", "T", C + R), "float32")
    normed = b.norm.layer(keys, b.param("nw", (D,)), b.param("nb", (D,)), eps=1e-6)
    logits = b.indexer.logits(q, normed, w, scale=0.3)
    idx = b.indexer.topk(logits, k=K)
    b.output("normed", normed)
    b.output("logits", logits)
    b.output("idx", idx)
    b.output("out", b.attention.mla_sparse_absorbed(lat_q, cache, idx, scale=0.2, kv_lora_rank=C))
    graph = b.build()
    weights = {"nw": torch.randn(D, generator=G), "nb": torch.randn(D, generator=G)}
    return graph, weights, compile_tvm(graph, weights)


@pytest.mark.parametrize("s,t", [(1, 2), (4, 4), (2, 9), (1, 12)])   # T below, at and above K; T = 4 x K
def test_dsa_chain_matches_eager(dsa, s, t):
    graph, weights, compiled = dsa
    assert compiled.report.counts().get("fallback", 0) == 0, str(compiled.report)
    r = lambda *shape: torch.randn(*shape, generator=G)  # noqa: E731
    check(compiled, graph, weights, {"q": r(2, s, H, D), "k": r(2, t, D), "w": r(2, s, H), "lq": r(2, s, 2, C + R),
                                     "c": r(2, t, C + R)})
