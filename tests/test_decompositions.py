"""Every domain op's decomposition, lowered all the way to primitives, matches its reference.

Each case builds a small graph around one domain op (dims symbolic where the op
allows: B, S, T, N), lowers every domain node with `decompose_node(..., recursive=True)`,
checks the result is valid IR made of primitives only, and runs both graphs in the
interpreter on fresh random inputs: fp32 to 1e-5 relative error, bf16 to ~1e-2,
integer outputs (expert ids, orders, offsets) exactly.
"""
from __future__ import annotations

import pytest
import torch
from v4_loops import NO_DECOMPOSITION

from dsgraph import GraphBuilder, run
from dsgraph.decompose import decompose_node
from dsgraph.errors import UnknownOpError, VerifyError
from dsgraph.ops import all_ops, defop, get_op, scratch_ops

GEN = torch.Generator().manual_seed(1234)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=GEN).to(dtype)


def randint(hi, *shape):
    return torch.randint(0, hi, shape, generator=GEN)


def lower(graph):
    """A copy of `graph` with every domain node replaced by primitives."""
    g = graph.copy()
    for node in list(g.nodes):
        if node.opdef.level == "domain":
            for old, new in zip(node.outputs, decompose_node(g, node, recursive=True)):
                g.replace_all_uses(old, new)
            g.erase_node(node)
    g.verify()
    left = sorted({n.op for n in g.nodes if n.opdef.level != "primitive"})
    assert not left, f"decomposition left non-primitive ops {left}"
    return g


def build(op, tensors, sym=None, dtype="float32", **attrs):
    """A graph applying `op` to activation inputs named like `tensors` (types from `sym` where given)."""
    b = GraphBuilder(op, dtype)
    vals = []
    for name, t in tensors.items():
        shape = (sym or {}).get(name, tuple(t.shape))
        vals.append(b.input(name, shape, str(t.dtype).removeprefix("torch.")))
    out = b.op(op, *vals, **attrs)
    for i, v in enumerate(out if isinstance(out, tuple) else (out,)):
        b.output(f"out{i}", v)
    return b.build()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(op, tensors, sym=None, tol=1e-5, **attrs):
    graph = build(op, tensors, sym, **attrs)
    lowered = lower(graph)
    want, got = run(graph, {}, tensors), run(lowered, {}, tensors)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        if want[k].is_floating_point():
            assert rel(got[k], want[k]) <= tol, (op, k, rel(got[k], want[k]))
        else:
            assert torch.equal(got[k], want[k]), (op, k)
    return lowered


COVERED: set[str] = set()


def covers(*ops):
    def deco(fn):
        COVERED.update(ops)
        return fn
    return deco


# ---------------------------------------------------------------- norms, MLPs, FP8
@covers("norm.rms", "norm.add_rms", "mlp.swiglu", "mtp.branch")
@pytest.mark.parametrize("dt,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_norms_and_mlps(dt, tol):
    x, r = randn(2, 3, 16, dtype=dt), randn(2, 3, 16, dtype=dt)
    sym = {"x": ("B", "S", 16), "r": ("B", "S", 16), "e": ("B", "S", 16)}
    check("norm.rms", {"x": x, "w": randn(16, dtype=dt)}, sym, tol, eps=1e-5)
    check("norm.add_rms", {"x": x, "r": r, "w": randn(16, dtype=dt)}, sym, tol)
    check("mlp.swiglu", {"x": x, "g": randn(24, 16, dtype=dt), "u": randn(24, 16, dtype=dt),
                         "d": randn(16, 24, dtype=dt)}, sym, tol)
    check("mtp.branch", {"x": x, "e": r, "en": randn(16, dtype=dt), "hn": randn(16, dtype=dt),
                         "w": randn(16, 32, dtype=dt)}, sym, tol)


@covers("linear_fp8", "dequant_fp8")
@pytest.mark.parametrize("n,k,block", [(20, 12, (8, 8)), (16, 16, (8, 4)), (7, 33, (128, 128))])
def test_fp8(n, k, block):
    w = randn(n, k).to(torch.float8_e4m3fn)
    s = torch.rand(-(-n // block[0]), -(-k // block[1]), generator=GEN) + 0.5
    lowered = check("dequant_fp8", {"w": w, "s": s}, block=block)
    assert "cast" in {nd.op for nd in lowered.nodes}
    check("linear_fp8", {"x": randn(3, 5, k), "w": w, "s": s}, {"x": ("B", "S", k)}, block=block)
    check("linear_fp8", {"x": randn(4, k, dtype=torch.bfloat16), "w": w, "s": s}, tol=1e-2, block=block)


# ---------------------------------------------------------------- RoPE
ROPE_VARIANTS = [
    {},
    {"scaling": "linear", "factor": 4.0},
    {"scaling": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "mscale": 1.0,
     "mscale_all_dim": 0.7, "beta_fast": 32.0, "beta_slow": 1.0},
    {"scaling": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "mscale": 0.0},
    {"scaling": "llama3", "factor": 8.0, "original_max_position_embeddings": 32, "theta": 500000.0},
]


@covers("rope")
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("variant", range(len(ROPE_VARIANTS)))
def test_rope(variant, interleaved):
    attrs = dict(ROPE_VARIANTS[variant], interleaved=interleaved)
    pos = randint(5000, 2, 5)
    check("rope", {"x": randn(2, 5, 3, 10), "p": pos}, {"x": ("B", "S", 3, 10), "p": ("B", "S")}, **attrs)
    check("rope", {"x": randn(2, 5, 6), "p": pos}, **attrs)  # rank 3, concrete dims
    check("rope", {"x": randn(2, 5, 1, 8, dtype=torch.bfloat16), "p": pos}, tol=1e-2, **attrs)


# ---------------------------------------------------------------- attention and MLA
@covers("attention.gqa", "attention.mla", "cache.append")
@pytest.mark.parametrize("hq,hkv,causal", [(4, 2, True), (3, 3, True), (4, 1, False), (6, 2, False)])
def test_attention(hq, hkv, causal):
    b, s, t, d, dv = 2, 3, 4, 8, 5
    q, k, v = randn(b, s, hq, d), randn(b, t, hkv, d), randn(b, t, hkv, dv)
    sym = {"q": ("B", "S", hq, d), "k": ("B", "T", hkv, d), "v": ("B", "T", hkv, dv)}
    check("attention.gqa", {"q": q, "k": k, "v": v}, sym, scale=0.37, causal=causal)
    if hq == hkv:
        check("attention.mla", {"q": q, "k": k, "v": v}, sym, scale=0.37, causal=causal)
    check("cache.append", {"c": k, "n": randn(b, s, hkv, d)}, {"c": ("B", "T", hkv, d), "n": ("B", "S", hkv, d)})


def test_attention_over_grown_cache_symbolic():
    """Keys of length T+S (a cache grown by the new tokens), all dims symbolic, one graph, two sizes."""
    b = GraphBuilder("attn")
    q = b.input("q", ("B", "S", 4, 8), "float32")
    kc, vc = b.input("kc", ("B", "T", 2, 8), "float32"), b.input("vc", ("B", "T", 2, 6), "float32")
    k = b.cache.append(kc, b.input("k", ("B", "S", 2, 8), "float32"))
    v = b.cache.append(vc, b.input("v", ("B", "S", 2, 6), "float32"))
    b.output("o", b.attention.gqa(q, k, v, scale=0.3))
    graph = b.build()
    lowered = lower(graph)
    for bs, s, t in [(1, 1, 6), (2, 4, 0), (3, 2, 3)]:
        ins = {"q": randn(bs, s, 4, 8), "kc": randn(bs, t, 2, 8), "vc": randn(bs, t, 2, 6),
               "k": randn(bs, s, 2, 8), "v": randn(bs, s, 2, 6)}
        assert rel(run(lowered, {}, ins)["o"], run(graph, {}, ins)["o"]) <= 1e-5


@pytest.mark.parametrize("dt,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_attention_dtypes(dt, tol):
    q, k, v = randn(2, 5, 4, 16, dtype=dt), randn(2, 7, 2, 16, dtype=dt), randn(2, 7, 2, 16, dtype=dt)
    check("attention.gqa", {"q": q, "k": k, "v": v}, tol=tol, scale=0.25)


@covers("attention.mla_absorbed")
@pytest.mark.parametrize("causal", [True, False])
def test_mla_absorbed(causal):
    c, r = 12, 4
    check("attention.mla_absorbed", {"q": randn(2, 3, 5, c + r), "cache": randn(2, 6, c + r)},
          {"q": ("B", "S", 5, c + r), "cache": ("B", "T", c + r)}, scale=0.2, causal=causal, kv_lora_rank=c)


@covers("attention.with_rope")
@pytest.mark.parametrize("inner", ["attention.gqa", "attention.mla", "attention.mla_absorbed"])
@pytest.mark.parametrize("rope_dims", [4, 16])
def test_attention_with_rope(inner, rope_dims):
    attrs = dict(ROPE_VARIANTS[-1], interleaved=inner != "attention.gqa")
    pos = randint(3000, 2, 3)
    if inner == "attention.mla_absorbed":
        ins = {"q": randn(2, 3, 5, 16), "p": pos, "cache": randn(2, 6, 16)}
        sym = {"q": ("B", "S", 5, 16), "p": ("B", "S"), "cache": ("B", "T", 16)}
        attrs["kv_lora_rank"] = 16 - min(rope_dims, 8)
        rope_dims = min(rope_dims, 8)
    else:
        hkv = 2 if inner == "attention.gqa" else 4
        ins = {"q": randn(2, 3, 4, 16), "p": pos, "k": randn(2, 6, hkv, 16), "v": randn(2, 6, hkv, 8)}
        sym = {"q": ("B", "S", 4, 16), "p": ("B", "S"), "k": ("B", "T", hkv, 16), "v": ("B", "T", hkv, 8)}
    check("attention.with_rope", ins, sym, inner=inner, rope_dims=rope_dims, scale=0.3, **attrs)


@covers("mla.latent_proj", "mla.decompress")
@pytest.mark.parametrize("dt,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_mla_projections(dt, tol):
    check("mla.latent_proj", {"x": randn(2, 3, 16, dtype=dt), "w": randn(12 + 4, 16, dtype=dt),
                              "nw": randn(12, dtype=dt)}, {"x": ("B", "S", 16)}, tol, kv_lora_rank=12, eps=1e-6)
    check("mla.decompress", {"c": randn(2, 3, 12, dtype=dt), "k_pe": randn(2, 3, 1, 4, dtype=dt),
                             "w": randn(3 * (6 + 5), 12, dtype=dt)},
          {"c": ("B", "S", 12), "k_pe": ("B", "S", 1, 4)}, tol, num_heads=3, qk_nope_dim=6, v_dim=5)


@covers("mla.latent_row", "mla.query_absorbed")
def test_mla_fused_rows():
    pos = torch.tensor([[3, 4], [9, 10]])
    check("mla.latent_row", {"c": randn(2, 2, 12), "k": randn(2, 2, 4), "nw": randn(12), "p": pos},
          {"c": ("B", "S", 12), "k": ("B", "S", 4), "p": ("B", "S")}, interleaved=True, eps=1e-6)
    check("mla.query_absorbed", {"qn": randn(2, 2, 3, 6), "qp": randn(2, 2, 3, 4), "w": randn(3, 6, 10), "p": pos},
          {"qn": ("B", "S", 3, 6), "qp": ("B", "S", 3, 4), "p": ("B", "S")}, scaling="yarn", factor=4.0)


# ---------------------------------------------------------------- MoE
ROUTES = [
    dict(top_k=2, scoring="softmax"),
    dict(top_k=3, scoring="softmax", norm_topk_prob=True, routed_scaling_factor=1.5),
    dict(top_k=2, scoring="softmax", method="group_limited", n_group=4, topk_group=2, routed_scaling_factor=16.0),
    dict(top_k=4, scoring="sigmoid", method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
         routed_scaling_factor=2.5),
    dict(top_k=1, scoring="sigmoid", method="noaux_tc", n_group=2, topk_group=1),
    dict(top_k=8, scoring="sigmoid", norm_topk_prob=True),  # top_k == num_experts
]


@covers("moe.route", "moe.gate")
@pytest.mark.parametrize("variant", range(len(ROUTES)))
@pytest.mark.parametrize("n", [1, 9])
def test_route(variant, n):
    attrs = ROUTES[variant]
    bias = {"bias": randn(8)} if attrs.get("method") == "noaux_tc" else {}
    check("moe.route", {"logits": randn(n, 8), **bias}, {"logits": ("N", 8)}, **attrs)
    check("moe.gate", {"x": randn(n, 16), "w": randn(8, 16), **bias}, {"x": ("N", 16)}, **attrs)


def expert_weights(e, d, i, dtype=torch.float32):
    ws = {}
    for j in range(e):
        ws.update({f"g{j}": randn(i, d, dtype=dtype) / 4, f"u{j}": randn(i, d, dtype=dtype) / 4,
                   f"d{j}": randn(d, i, dtype=dtype) / 4})
    return ws


@covers("moe.experts")
@pytest.mark.parametrize("n,k,idx", [
    (7, 2, None),            # random routing
    (5, 2, "one_expert"),    # every token to expert 3 (others idle)
    (4, 4, "all"),           # top_k == num_experts
    (1, 2, None),            # a single token
])
def test_experts(n, k, idx):
    e, d = 4, 8
    if idx == "one_expert":
        indices = torch.tensor([[3, 1]] * n)
    elif idx == "all":
        indices = torch.stack([torch.randperm(e, generator=GEN) for _ in range(n)])
    else:
        indices = torch.stack([torch.randperm(e, generator=GEN)[:k] for _ in range(n)])
    t = {"x": randn(n, d), "w": torch.rand(n, k, generator=GEN), "i": indices, **expert_weights(e, d, 6)}
    check("moe.experts", t, {"x": ("N", d), "w": ("N", k), "i": ("N", k)}, num_experts=e)


def test_experts_bf16():
    e, d, n = 3, 8, 6
    t = {"x": randn(n, d, dtype=torch.bfloat16), "w": torch.rand(n, 2, generator=GEN),
         "i": torch.stack([torch.randperm(e, generator=GEN)[:2] for _ in range(n)]),
         **expert_weights(e, d, 5, torch.bfloat16)}
    check("moe.experts", t, tol=1e-2, num_experts=e)


@covers("moe.permute", "moe.grouped_gemm", "moe.unpermute")
@pytest.mark.parametrize("n,k,e,pattern", [(6, 2, 5, "random"), (4, 3, 3, "one"), (1, 2, 4, "random"),
                                           (5, 4, 4, "all")])
def test_grouped_moe(n, k, e, pattern):
    if pattern == "one":  # expert 0 gets every token's first slot, expert 1 none
        indices = torch.tensor([[0, 2, 2]] * n)
    else:
        indices = torch.stack([torch.randperm(e, generator=GEN)[:k] for _ in range(n)])
    sym = {"x": ("N", 8), "i": ("N", k), "w": ("N", k)}
    check("moe.permute", {"x": randn(n, 8), "i": indices}, sym, num_experts=e)
    counts = torch.bincount(indices.flatten(), minlength=e)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    check("moe.grouped_gemm", {"x": randn(n * k, 8), "w": randn(e, 6, 8), "offsets": offsets},
          {"x": ("M", 8)})
    order = torch.argsort(indices.flatten(), stable=True)
    check("moe.unpermute", {"y": randn(n * k, 8), "w": torch.rand(n, k, generator=GEN), "order": order},
          {"y": ("M", 8), "w": ("N", k), "order": ("M",)})


def test_grouped_pipeline_matches_experts():
    """permute -> grouped_gemm(gate|up) -> act -> grouped_gemm(down) -> unpermute == moe.experts, lowered."""
    n, k, e, d, i = 7, 2, 4, 8, 6
    ws = expert_weights(e, d, i)
    b = GraphBuilder("moe")
    x, w, idx = b.input("x", ("N", d), "float32"), b.input("w", ("N", k), "float32"), b.input("i", ("N", k))
    experts = [b.input(name, tuple(t.shape), "float32") for name, t in ws.items()]
    gu = b.input("gu", (e, 2 * i, d), "float32")
    dn = b.input("dn", (e, d, i), "float32")
    xp, order, offs = b.moe.permute(x, idx, num_experts=e)
    y = b.moe.grouped_gemm(b.op("act.swiglu", b.moe.grouped_gemm(xp, gu, offs)), dn, offs)
    b.output("grouped", b.moe.unpermute(y, w, order))
    b.output("dense", b.moe.experts(x, w, idx, *experts, num_experts=e))
    graph = b.build()
    ins = {"x": randn(n, d), "w": torch.rand(n, k, generator=GEN),
           "i": torch.stack([torch.randperm(e, generator=GEN)[:k] for _ in range(n)]), **ws,
           "gu": torch.stack([torch.cat([ws[f"g{j}"], ws[f"u{j}"]]) for j in range(e)]),
           "dn": torch.stack([ws[f"d{j}"] for j in range(e)])}
    out = run(lower(graph), {}, ins)
    assert rel(out["grouped"], out["dense"]) <= 1e-5
    assert rel(out["dense"], run(graph, {}, ins)["dense"]) <= 1e-5


# ---------------------------------------------------------------- DeepSeek-V4
@covers("act.swiglu_clamped", "norm.rms_unweighted", "cache.slide", "linear.grouped", "hc.pre", "hc.post", "hc.head",
        "moe.route_sqrtsoftplus", "moe.route_hash", "mlp.swiglu_clamped", "moe.experts_clamped")
def test_v4_ops():
    x4 = randn(2, 3, 4, 8)
    sym = {"x": ("B", "S", 4, 8), "y": ("B", "S", 8), "p": ("B", "S", 4), "c": ("B", "S", 4, 4)}
    check("norm.rms_unweighted", {"x": x4}, sym, eps=1e-5)
    check("act.swiglu_clamped", {"x": randn(6, 10) * 2}, limit=0.6)
    check("cache.slide", {"x": randn(2, 5, 3), "n": randn(2, 3, 3)}, {"x": ("B", 5, 3), "n": ("B", "S", 3)})
    check("linear.grouped", {"x": randn(2, 3, 2, 8), "w": randn(10, 8)}, {"x": ("B", "S", 2, 8)})
    check("hc.pre", {"x": x4, "f": randn(24, 32), "b": randn(24), "s": randn(3)}, sym, iters=5)
    check("hc.post", {"x": x4, "y": randn(2, 3, 8), "p": randn(2, 3, 4), "c": randn(2, 3, 4, 4)}, sym)
    check("hc.head", {"x": x4, "f": randn(4, 32), "b": randn(4), "s": randn(1)}, sym)
    logits = randn(6, 8) * 4
    check("moe.route_sqrtsoftplus", {"l": logits, "b": torch.rand(8, generator=GEN)}, top_k=3,
          routed_scaling_factor=1.5)
    table = torch.stack([torch.randperm(8, generator=GEN)[:2] for _ in range(10)])
    check("moe.route_hash", {"l": logits, "t": table, "i": randint(10, 6)}, routed_scaling_factor=2.0)
    ws = {f"w{j}": randn(5, 8) if j % 3 < 2 else randn(8, 5) for j in range(6)}
    for limit in (0.4, 30.0):
        check("mlp.swiglu_clamped", {"x": randn(6, 8), **dict(list(ws.items())[:3])}, limit=limit)
        check("moe.experts_clamped", {"x": randn(6, 8), "w": torch.rand(6, 2, generator=GEN),
                                      "i": randint(2, 6, 2), **ws}, num_experts=2, limit=limit)


# ---------------------------------------------------------------- the helper itself
def test_every_domain_op_has_a_tested_decomposition():
    domain = {op.name for op in all_ops("domain")}
    assert {op for op in domain if get_op(op).decompose_fn is None} == NO_DECOMPOSITION
    assert domain - COVERED - NO_DECOMPOSITION == set(), "domain ops without a decomposition test"


def test_decompose_node_leaves_rewiring_to_the_caller():
    g = build("mlp.swiglu", {"x": randn(2, 4), "g": randn(3, 4), "u": randn(3, 4), "d": randn(4, 3)})
    node = g.find("mlp.swiglu")[0]
    new = decompose_node(g, node)
    assert g.nodes[-1] is node and new[0].node is g.nodes[-2]       # inserted right before it
    assert all(n.meta.get("origin") == node.outputs[0].name for n in g.nodes[:-1])
    g.replace_all_uses(node.outputs[0], new[0])
    g.erase_node(node)
    g.verify()
    assert [n.op for n in g.nodes] == ["linear", "silu", "linear", "mul", "linear"]


def test_non_recursive_keeps_inner_domain_ops():
    g = build("mla.latent_proj", {"x": randn(2, 8), "w": randn(6, 8), "nw": randn(4)}, kv_lora_rank=4)
    decompose_node(g, g.find("mla.latent_proj")[0])
    assert len(g.find("norm.rms")) == 1


def test_decompose_errors():
    g = build("linear", {"x": randn(2, 4), "w": randn(3, 4)})
    with pytest.raises(UnknownOpError, match="linear has no decomposition"):
        decompose_node(g, g.nodes[0])
    with scratch_ops():  # other tests walk the registry
        bad = defop("test.bad_decomp", "x", doc="a decomposition of the wrong type", level="domain")
        bad.infer(lambda x: x)
        bad.decomposition(lambda b, x: b.cast(x, dtype="bfloat16"))
        g = build("test.bad_decomp", {"x": randn(2, 4)})
        with pytest.raises(VerifyError, match=r"test.bad_decomp.*bfloat16\[2, 4\].*float32\[2, 4\]"):
            decompose_node(g, g.nodes[0])


@pytest.mark.parametrize("preset", ["r1-distill-llama-tiny", "deepseek-moe-tiny", "deepseek-v3-tiny",
                                    "deepseek-v3-fp8-tiny"])
def test_whole_tiny_model_lowered_to_primitives(preset):
    """A full decoder (GQA or MLA, MoE routing, MTP, FP8, caches) lowered to primitives gives the same outputs."""
    models = pytest.importorskip("models")
    model = models.build_model(preset, seed=0)
    graph, env = model.graph, {"B": 2, "S": 3, "T": 2}
    ins = {}
    for name, v in graph.inputs.items():
        if v.kind != "param":
            shape = v.type.concrete(env)
            ins[name] = randint(50, *shape) if v.type.dtype == "int64" else randn(*shape)
    want, got = run(graph, model.weights, ins), run(lower(graph), model.weights, ins)
    for k in want:
        assert rel(got[k], want[k]) <= 1e-5, k


# ---------------------------------------------------------------- vision (DeepSeek-VL, Janus)
@covers("vision.patch_embed", "mlp.gelu", "vision.splice", "norm.group")
@pytest.mark.parametrize("dt,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_vision_ops(dt, tol):
    check("vision.patch_embed", {"x": randn(2, 3, 12, 20, dtype=dt), "w": randn(6, 3, 4, 4, dtype=dt),
                                 "b": randn(6, dtype=dt)}, {"x": ("N", 3, 12, 20)}, tol)
    check("mlp.gelu", {"x": randn(2, 5, 8, dtype=dt), "w1": randn(12, 8, dtype=dt), "b1": randn(12, dtype=dt),
                       "w2": randn(4, 12, dtype=dt), "b2": randn(4, dtype=dt)}, {"x": ("B", "S", 8)}, tol,
          approximate="tanh")
    check("norm.group", {"x": randn(2, 8, 3, 5, dtype=dt), "w": randn(8, dtype=dt), "b": randn(8, dtype=dt)},
          {"x": ("N", 8, 3, 5)}, tol, groups=4)
    ids = torch.tensor([[5, 1, 5, 5], [2, 5, 3, 5]])
    sym = {"e": ("B", "S", 8), "ids": ("B", "S"), "f": ("I", 8)}
    for rows in (5, 3, 0):   # prefill with images; more placeholders than rows; a decode step
        check("vision.splice", {"e": randn(2, 4, 8, dtype=dt), "ids": ids, "f": randn(rows, 8, dtype=dt)},
              sym, tol, token_id=5)



@covers("vision.resize", "vision.window_partition", "attention.rel_pos", "vision.pixel_shuffle")
@pytest.mark.parametrize("dt,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sam_ops(dt, tol):
    """DeepSeek-VL hybrid's SAM: the resize as two matmuls with constant matrices, the window partition's zero
    padding, the relative-position attention as einsums and a softmax; VL2's pixel shuffle as a zero pad, a
    reshape and a permute."""
    check("vision.resize", {"x": randn(2, 3, 4, 5, dtype=dt)}, {"x": ("N", 3, 4, 5)}, tol, height=8, width=3)
    check("vision.window_partition", {"x": randn(2, 4, 5, 3, dtype=dt)}, {"x": ("N", 4, 5, 3)}, tol, window=3)
    check("vision.pixel_shuffle", {"x": randn(2, 9, 3, dtype=dt)}, {"x": ("N", 9, 3)}, tol, ratio=2)   # padded
    qkv = {n: randn(2, 6, 2, 4, dtype=dt) for n in "qkv"}
    check("attention.rel_pos", {**qkv, "rh": randn(2, 2, 4, dtype=dt), "rw": randn(3, 3, 4, dtype=dt)},
          {n: ("M", 6, 2, 4) for n in "qkv"}, tol, scale=0.5)

# ---------------------------------------------------------------- DeepSeek Sparse Attention (V3.2)
@covers("norm.layer", "indexer.logits", "indexer.topk", "attention.mla_sparse", "attention.mla_sparse_absorbed")
@pytest.mark.parametrize("s,t,k", [(3, 3, 2), (2, 7, 3), (4, 9, 12)])   # T above and below k
def test_sparse_attention(s, t, k):
    check("norm.layer", {"x": randn(2, s, 16), "w": randn(16), "b": randn(16)}, {"x": ("B", "S", 16)})
    ins = {"q": randn(2, s, 3, 8), "k": randn(2, t, 8), "w": randn(2, s, 3)}
    sym = {"q": ("B", "S", 3, 8), "k": ("B", "T", 8), "w": ("B", "S", 3)}
    check("indexer.logits", ins, sym, scale=0.3, causal=False)
    fp8 = {"q": randn(2, s, 3, 256), "k": randn(2, t, 256), "w": ins["w"]}        # two groups of 128 per row
    # fp8: q and k rounded to e4m3 on both sides, by different float ops: a value on a rounding boundary may land
    # one e4m3 step apart, ~1e-4 of the logits' norm (as in test_fp8_index_keys)
    check("indexer.logits", fp8, {"q": ("B", "S", 3, 256), "k": ("B", "T", 256), "w": ("B", "S", 3)}, tol=1e-3,
          scale=0.3, causal=False, fp8=True)
    logits = run(build("indexer.logits", ins, sym, scale=0.3), {}, ins)["out0"]      # causal: -inf past horizons
    idx = run(check("indexer.topk", {"x": logits}, {"x": ("B", "S", "T")}, k=k), {}, {"x": logits})["out0"]
    assert bool((idx == -1).any()) == (t - s + 1 < k)          # the first queries' horizons leave empty slots
    sym = {"q": ("B", "S", 3, 10), "k": ("B", "T", 3, 10), "v": ("B", "T", 3, 6), "i": ("B", "S", k)}
    check("attention.mla_sparse", {"q": randn(2, s, 3, 10), "k": randn(2, t, 3, 10), "v": randn(2, t, 3, 6),
                                   "i": idx}, sym, scale=0.3)
    check("attention.mla_sparse_absorbed", {"q": randn(2, s, 4, 12), "c": randn(2, t, 12), "i": idx.int()},
          {"q": ("B", "S", 4, 12), "c": ("B", "T", 12), "i": ("B", "S", k)}, scale=0.3, kv_lora_rank=9)


@covers("indexer.quant_fp8", "indexer.logits_fp8")
def test_fp8_index_keys():
    k = randn(2, 5, 256) * 3
    lowered = check("indexer.quant_fp8", {"x": k}, {"x": ("B", "T", 256)})
    k8, ks = run(lowered, {}, {"x": k})["out0"], run(lowered, {}, {"x": k})["out1"]
    # q is rotated then rounded to e4m3 on both sides, the rotation by other float ops: a value on a rounding
    # boundary may land one e4m3 step (12.5 %) apart, ~1e-4 of the logits' norm
    check("indexer.logits_fp8", {"q": randn(2, 3, 2, 256), "k": k8, "s": ks, "w": randn(2, 3, 2)},
          {"q": ("B", "S", 2, 256), "k": ("B", "T", 256), "s": ("B", "T", 2), "w": ("B", "S", 2)}, tol=1e-3,
          scale=0.3, causal=False)


@covers("kv.quant_fp8", "kv.dequant_fp8")
def test_fp8_kv_rows():
    x = randn(2, 3, 32) * 4
    lowered = check("kv.quant_fp8", {"x": x}, {"x": ("B", "S", 32)}, group=16)
    q, s = run(lowered, {}, {"x": x})["out0"], run(lowered, {}, {"x": x})["out1"]
    check("kv.dequant_fp8", {"q": q, "s": s}, {"q": ("B", "T", 32), "s": ("B", "T", 2)}, group=16)


@covers("v4.compress", "attention.sink", "indexer.slot_mask")
@pytest.mark.parametrize("p0", [0, 6])
def test_v4_position_indexed_ops(p0):
    pos = (p0 + torch.arange(9)).expand(2, 9).contiguous()
    past = torch.zeros(2, p0, 0, dtype=torch.long)
    for ratio, overlap in ((4, True), (3, False)):
        rows = (2 if overlap else 1) * ratio - 1
        check("v4.compress", {"kv": randn(2, 9, 6), "g": randn(2, 9, 6), "st": randn(2, rows, 12),
                              "bias": randn(ratio, 6), "p": pos, "past": past},
              {"kv": ("B", "S", 6), "g": ("B", "S", 6), "st": ("B", rows, 12), "p": ("B", "S"),
               "past": ("B", "T", 0)}, ratio=ratio, overlap=overlap)
    t = (p0 + 9) // 4 + 1           # compact entries, the last one not yet visible to any query
    ins = {"q": randn(2, 9, 3, 8), "kv": randn(2, 4 + 9, 8), "sk": randn(3), "p": pos, "c": randn(2, t, 8),
           "i": torch.randint(-1, t, (2, 9, 3), generator=GEN)}
    sym = {"q": ("B", "S", 3, 8), "kv": ("B", "S+4", 8), "p": ("B", "S"), "c": ("B", "N", 8), "i": ("B", "S", 3)}
    check("attention.sink", ins, sym, window=5, ratio=4, scale=0.3)
    check("attention.sink", {k: ins[k] for k in ("q", "kv", "sk", "p", "c")}, sym, window=5, ratio=3, scale=0.3)
    check("attention.sink", {k: ins[k] for k in ("q", "kv", "sk", "p")}, sym, window=5, scale=0.3)
    x = {"x": randn(2, 9, t), "p": pos}
    graph = build("indexer.slot_mask", x, {"x": ("B", "S", "N"), "p": ("B", "S")}, ratio=4)
    want, got = run(graph, {}, x)["out0"], run(lower(graph), {}, x)["out0"]
    seen = ((pos[..., None] + 1) // 4).clamp(max=t)       # entries each query sees
    assert torch.equal(want, got) and torch.isinf(want).sum() == (t - seen).sum()
