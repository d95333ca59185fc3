"""TVM lowerings of the domain ops — RMSNorm, RoPE (every scaling, both layouts), GQA / naive / absorbed MLA,
the MLA projections, SwiGLU, MTP, routing (every DeepSeek variant), per-expert and grouped MoE, FP8 — against
their torch references on llvm. One build per family (module fixtures), run at several odd sizes."""
import pytest
import torch

pytest.importorskip("tvm")

from dsgraph.builder import GraphBuilder  # noqa: E402
from tests.test_tvm_ops import check, compile_tvm  # noqa: E402

ROPES = {
    "plain": {},
    "linear": {"scaling": "linear", "factor": 4.0, "theta": 100000.0},
    "yarn_interleaved": {"scaling": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "mscale": 0.707, "mscale_all_dim": 0.707, "interleaved": True},
    "llama3": {"scaling": "llama3", "factor": 8.0, "original_max_position_embeddings": 64, "theta": 500000.0},
}


# ------------------------------------------------------------------------------------------------ norm, rope, attention
@pytest.fixture(scope="module")
def attention_graph():
    b = GraphBuilder("attn")
    x = b.input("x", ("B", "S", 20), "float32")
    pos = b.input("pos", ("B", "S"), "int64")
    kc, vc = b.input("kc", ("B", "T", 2, 10), "float32"), b.input("vc", ("B", "T", 2, 10), "float32")
    lat = b.input("lat", ("B", "L", 11), "float32")  # latent cache, at least one row
    nw, r = b.param("nw", (20,)), b.input("r", ("B", "S", 20), "float32")
    b.output("rms", b.norm.rms(x, nw, eps=1e-5))
    y, s = b.norm.add_rms(x, r, nw, eps=1e-6)
    b.output("add_rms", y)
    b.output("add_rms_sum", s)
    heads = b.reshape(x, shape=("B", "S", 2, 10))
    for name, attrs in ROPES.items():
        b.output(f"rope_{name}", b.rope(heads, pos, **attrs))
    q = b.reshape(b.linear(x, b.param("wq", (60, 20))), shape=("B", "S", 6, 10))  # 6 query heads on 2 kv heads
    k_all, v_all = b.cache.append(kc, heads), b.cache.append(vc, b.rope(heads, pos))
    b.output("gqa", b.attention.gqa(q, k_all, v_all, scale=0.31))
    # naive MLA: 3 heads, qk dim 12 = nope 8 + rope 4, v dim 7
    c_kv, k_pe = b.mla.latent_proj(x, b.param("wkv_a", (9 + 4, 20)), b.param("kv_norm", (9,)), kv_lora_rank=9)
    k_pe = b.rope(b.reshape(k_pe, shape=("B", "S", 1, 4)), pos, **ROPES["yarn_interleaved"])
    k, v = b.mla.decompress(c_kv, k_pe, b.param("wkv_b", (3 * 15, 9)), num_heads=3, qk_nope_dim=8, v_dim=7)
    b.output("c_kv", c_kv)
    b.output("k", k)
    qm = b.reshape(b.linear(x, b.param("wqm", (36, 20))), shape=("B", "S", 3, 12))
    b.output("mla", b.attention.mla(qm, k, v, scale=0.29))
    # absorbed MLA over a latent cache of width C + R = 8 + 3
    qa = b.reshape(b.linear(x, b.param("wqa", (33, 20))), shape=("B", "S", 3, 11))
    b.output("mla_absorbed", b.attention.mla_absorbed(qa, b.cache.append(lat, b.slice(x, dim=2, start=0, end=11)),
                                                      scale=0.4, kv_lora_rank=8))
    b.output("mla_absorbed_nocausal", b.attention.mla_absorbed(qa, lat, scale=0.4, kv_lora_rank=8, causal=False))
    g = b.build()
    shapes = {"nw": (20,), "wq": (60, 20), "wkv_a": (13, 20), "kv_norm": (9,), "wkv_b": (45, 9), "wqm": (36, 20),
              "wqa": (33, 20)}
    w = {n: torch.randn(s) * (0.3 if len(s) == 2 else 1.0) for n, s in shapes.items()}
    return g, w, compile_tvm(g, w)


@pytest.mark.parametrize("bs,t", [((2, 3), 0), ((1, 1), 5), ((3, 4), 2)])
def test_norm_rope_attention(attention_graph, bs, t):
    g, w, c = attention_graph
    start = torch.randint(0, 50, (bs[0], 1))
    check(c, g, w, {"x": torch.randn(*bs, 20), "r": torch.randn(*bs, 20),
                    "pos": start + torch.arange(bs[1]) + t,  # ragged starts per sequence, past the cache
                    "kc": torch.randn(bs[0], t, 2, 10), "vc": torch.randn(bs[0], t, 2, 10),
                    "lat": torch.randn(bs[0], t + 1, 11)})


# ------------------------------------------------------------------------------------------------ MLP, MoE, FP8
ROUTES = {
    "softmax_greedy": {"top_k": 3},
    "softmax_group": {"top_k": 3, "method": "group_limited", "n_group": 4, "topk_group": 2,
                      "routed_scaling_factor": 2.0},
    "sigmoid_noaux": {"top_k": 2, "scoring": "sigmoid", "method": "noaux_tc", "n_group": 4, "topk_group": 2,
                      "norm_topk_prob": True, "routed_scaling_factor": 2.5},
    "all_experts": {"top_k": 8, "norm_topk_prob": True},
}
E, D, INTER = 8, 12, 6


@pytest.fixture(scope="module")
def moe_graph():
    b = GraphBuilder("moe")
    x = b.input("x", ("N", D), "float32")
    emb = b.input("emb", ("N", D), "float32")
    router, bias = b.param("router", (E, D)), b.param("bias", (E,))
    logits = b.linear(x, router)
    for name, attrs in ROUTES.items():
        w, idx = b.moe.route(logits, *([bias] if attrs.get("method") == "noaux_tc" else []), **attrs)
        b.output(f"{name}_w", w)
        b.output(f"{name}_idx", idx)
    gw, gidx = b.moe.gate(x, router, bias, **ROUTES["sigmoid_noaux"])
    b.output("gate_w", gw)
    b.output("gate_idx", gidx)
    per_expert = []
    for e in range(E):
        per_expert += [b.param(f"e{e}.gate", (INTER, D)), b.param(f"e{e}.up", (INTER, D)),
                       b.param(f"e{e}.down", (D, INTER))]
    b.output("experts", b.moe.experts(x, gw, gidx, *per_expert, num_experts=E))
    xp, order, offsets = b.moe.permute(x, gidx, num_experts=E)
    b.output("x_perm", xp)
    b.output("order", order)
    b.output("offsets", offsets)
    h = b.act.swiglu(b.moe.grouped_gemm(xp, b.param("gate_up", (E, 2 * INTER, D)), offsets))
    b.output("act", h)
    y = b.moe.grouped_gemm(h, b.param("down", (E, D, INTER)), offsets)
    b.output("grouped", y)
    b.output("unpermuted", b.moe.unpermute(y, gw, order))
    b.output("swiglu", b.mlp.swiglu(x, b.param("g", (INTER, D)), b.param("u", (INTER, D)), b.param("d", (D, INTER))))
    b.output("mtp", b.mtp.branch(x, emb, b.param("en", (D,)), b.param("hn", (D,)), b.param("eh", (D, 2 * D))))
    wq, sq = b.param("wq", (13, D), "float8_e4m3fn"), b.param("sq", (4, 3), "float32")  # 4x5 blocks, partial edges
    b.output("dequant", b.dequant_fp8(wq, sq, block=(4, 5)))
    b.output("linear_fp8", b.linear_fp8(x, wq, sq, block=(4, 5)))
    b.output("fp8_all_bytes", b.cast(b.param("all8", (16, 16), "float8_e4m3fn"), dtype="float32"))  # subnormals, NaN
    g = b.build()
    w = {n: torch.randn(tuple(int(d) for d in v.shape)) * 0.5 for n, v in g.params().items()
         if n not in ("wq", "sq", "all8")}
    w["wq"] = (torch.randn(13, D) * 2).to(torch.float8_e4m3fn)
    w["sq"] = torch.rand(4, 3) + 0.1
    w["all8"] = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    return g, w, compile_tvm(g, w)


@pytest.mark.parametrize("n", [1, 7, 30])
def test_mlp_moe_fp8(moe_graph, n):
    g, w, c = moe_graph
    check(c, g, w, {"x": torch.randn(n, D), "emb": torch.randn(n, D)})


def test_moe_reports_te_kernels(moe_graph):
    """The ops Relax has nothing for are hand-written TE/TIR; the rest Relax built-ins."""
    kinds = {k.op: k.kind for k in moe_graph[2].report.kernels}
    for op in ("moe.route", "moe.gate", "moe.experts", "moe.grouped_gemm", "dequant_fp8", "linear_fp8", "linear",
               "mlp.swiglu", "mtp.branch"):
        assert kinds[op] == "tir", op
    for op in ("moe.permute", "moe.unpermute", "act.swiglu"):
        assert kinds[op] == "relax", op
    assert any("stacked" in n for n in moe_graph[2].report.notes)
