"""Structural golden tests (TVM assert_structural_equal style): a small input graph, the expected
graph after the pass, compared structurally — plus the numeric proof harness on the same graph."""
import dsgraph.passes as passes
import torch
from dsgraph.models import quantize_fp8_block

from dsgraph import GraphBuilder, WeightStore

D, INTER, E, K = 16, 12, 3, 2


def rand_weights(graph, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, v in graph.params().items():
        shape = v.type.concrete({})
        out[n] = (1 + 0.1 * torch.randn(shape, generator=g)) if "norm" in n else torch.randn(shape, generator=g) / 4
    return WeightStore(out)


def golden(pass_spec, before_fn, after_fn, harness=True):
    before, expected = before_fn(GraphBuilder("g")), after_fn(GraphBuilder("g"))
    weights = rand_weights(before)
    after, w2, _ = passes.run_pipeline(before, weights, pass_spec if isinstance(pass_spec, list) else [pass_spec])
    passes.assert_structural_equal(after, expected)
    if harness:
        passes.check(pass_spec if isinstance(pass_spec, list) else [pass_spec], before, weights).raise_if_failed()


def tokens(b):
    return b.input("x", ("N", D), "float32")


def test_dce_and_cse():
    def before(b):
        x = tokens(b)
        b.mul(x, x)                                   # dead
        b.param("unused", (3,))                       # unread param
        b.output("y", b.add(b.exp(x), b.exp(x)))      # common subexpression
        return b.build()

    def after(b):
        x = tokens(b)
        e = b.exp(x)
        b.output("y", b.add(e, e))
        return b.build()

    golden(["cse", "dce"], before, after)


def test_fold_constants():
    def before(b):
        x = tokens(b)
        y = b.reshape(b.reshape(b.cast(x, dtype="float32"), shape=("N", 4, 4)), shape=("N", 2, 8))
        two = b.add(b.constant(value=1.5), b.constant(value=0.5))
        b.output("y", b.mul(y, two))
        return b.build()

    def after(b):
        x = tokens(b)
        b.output("y", b.mul(b.reshape(x, shape=("N", 2, 8)), b.constant(value=(2.0,), shape=())))
        return b.build()

    golden("fold_constants", before, after)


def test_prune_mtp_drops_outputs_caches_and_inputs():
    def common(b, mtp):
        x = b.input("x", ("B", "S", D), "float32")
        if mtp:
            ids = b.input("mtp_ids", ("B", "S"))
        main = b.cache_input("cache.0.k", ("B", "T", D))
        b.output("cache.0.k.next", b.cache.append(main, x), cache_of=main)
        b.output("y", b.exp(x))
        if mtp:
            mc = b.cache_input("cache.mtp.k", ("B", "T", D))
            h = b.add(x, b.embed(ids, b.param("mtp.embed", (7, D))))
            b.output("cache.mtp.k.next", b.cache.append(mc, h), cache_of=mc)
            b.output("mtp_logits", b.linear(h, b.param("mtp.head", (7, D))))
        return b.build()

    golden("prune_mtp", lambda b: common(b, True), lambda b: common(b, False))


def test_fuse_add_rmsnorm_keeps_the_residual():
    def before(b):
        x, r = tokens(b), b.input("r", ("N", D), "float32")
        s = b.add(r, x)
        b.output("y", b.add(s, b.norm.rms(s, b.param("n.weight", (D,)), eps=1e-5)))
        return b.build()

    def after(b):
        x, r = tokens(b), b.input("r", ("N", D), "float32")
        y, s = b.norm.add_rms(r, x, b.param("n.weight", (D,)), eps=1e-5)
        b.output("y", b.add(s, y))
        return b.build()

    golden("fuse_add_rmsnorm", before, after)


def test_fuse_swiglu_concatenates_gate_and_up():
    def before(b):
        x = tokens(b)
        gate, up = b.param("mlp.gate_proj.weight", (INTER, D)), b.param("mlp.up_proj.weight", (INTER, D))
        b.output("y", b.mlp.swiglu(x, gate, up, b.param("mlp.down_proj.weight", (D, INTER))))
        return b.build()

    def after(b):
        x = tokens(b)
        h = b.act.swiglu(b.linear(x, b.param("mlp.gate_up_proj.weight", (2 * INTER, D))))
        b.output("y", b.linear(h, b.param("mlp.down_proj.weight", (D, INTER))))
        return b.build()

    golden("fuse_swiglu", before, after)


def router(b, fused):
    x = tokens(b)
    gate = b.param("mlp.gate.weight", (E, D))
    attrs = dict(top_k=K, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.0)
    if fused:
        return x, b.moe.gate(x, gate, **attrs)
    return x, b.moe.route(b.linear(b.cast(x, dtype="float32"), gate), **attrs)


def experts(b, x, w, idx):
    ws = []
    for e in range(E):
        for proj, shape in (("gate_proj", (INTER, D)), ("up_proj", (INTER, D)), ("down_proj", (D, INTER))):
            ws.append(b.param(f"mlp.experts.{e}.{proj}.weight", shape))
    return b.moe.experts(x, w, idx, *ws, num_experts=E)


def test_fuse_router():
    def before(b):
        x, (w, idx) = router(b, False)
        b.output("w", w)
        b.output("idx", idx)
        return b.build()

    def after(b):
        x, (w, idx) = router(b, True)
        b.output("w", w)
        b.output("idx", idx)
        return b.build()

    golden("fuse_router", before, after)


def test_group_moe_stacks_experts_lazily():
    def before(b):
        x, (w, idx) = router(b, True)
        b.output("y", experts(b, x, w, idx))
        return b.build()

    def after(b):
        x, (w, idx) = router(b, True)
        gu = b.reshape(b.param("mlp.experts.gate_up_proj.weight", (E * 2 * INTER, D)), shape=(E, 2 * INTER, D))
        dn = b.reshape(b.param("mlp.experts.down_proj.weight", (E * D, INTER)), shape=(E, D, INTER))
        xp, order, offsets = b.moe.permute(x, idx, num_experts=E)
        y = b.moe.grouped_gemm(b.act.swiglu(b.moe.grouped_gemm(xp, gu, offsets)), dn, offsets)
        b.output("y", b.moe.unpermute(y, w, order))
        return b.build()

    golden("group_moe", before, after)
    g = before(GraphBuilder("g"))
    weights = rand_weights(g)
    _, w2, recs = passes.run_pipeline(g, weights, ["group_moe"])
    assert w2.is_lazy("mlp.experts.gate_up_proj.weight") and len(recs[0].params_removed) == 3 * E
    stacked = w2["mlp.experts.down_proj.weight"].view(E, D, INTER)
    torch.testing.assert_close(stacked[1], weights["mlp.experts.1.down_proj.weight"])


def test_group_moe_folds_shared_experts():
    def graph(b):
        x, (w, idx) = router(b, True)
        shared = b.mlp.swiglu(x, b.param("mlp.shared_experts.gate_proj.weight", (2 * INTER, D)),
                              b.param("mlp.shared_experts.up_proj.weight", (2 * INTER, D)),
                              b.param("mlp.shared_experts.down_proj.weight", (D, 2 * INTER)))
        b.output("y", b.add(experts(b, x, w, idx), shared))
        return b.build()

    g = graph(GraphBuilder("g"))
    res = passes.check([("group_moe", {"fold_shared_experts": True})], g, rand_weights(g)).raise_if_failed()
    after = res.records[0]
    assert after.ops_delta.get("mlp.swiglu") == -1 and after.ops_delta.get("add") == -1
    assert "mlp.experts.gate_up_proj_with_shared.weight" in after.params_added


def mla_block(b, absorbed, h=2, dn=4, dr=2, dv=3, c=6, sparse=False):
    """sparse: V3.2's form, attending to the positions of an int input `selected` [B,S,3]."""
    x = b.input("x", ("B", "S", D), "float32")
    pos = b.input("positions", ("B", "S"))
    extra = (b.input("selected", ("B", "S", 3)),) if sparse else ()
    q = b.reshape(b.linear(x, b.param("q_proj.weight", (h * (dn + dr), D))), shape=("B", "S", h, dn + dr))
    q_nope, q_pe = b.split(q, sizes=(dn, dr), dim=-1)
    q_pe = b.rope(q_pe, pos, interleaved=True)
    c_kv, k_pe = b.mla.latent_proj(x, b.param("kv_a.weight", (c + dr, D)), b.param("kv_a_norm.weight", (c,)),
                                   kv_lora_rank=c)
    k_pe = b.rope(b.reshape(k_pe, shape=("B", "S", 1, dr)), pos, interleaved=True)
    if not absorbed:
        k, v = b.mla.decompress(c_kv, k_pe, b.param("kv_b_proj.weight", (h * (dn + dv), c)), num_heads=h,
                                qk_nope_dim=dn, v_dim=dv)
        kc, vc = b.cache_input("cache.0.k", ("B", "T", h, dn + dr)), b.cache_input("cache.0.v", ("B", "T", h, dv))
        k_all, v_all = b.cache.append(kc, k), b.cache.append(vc, v)
        b.output("cache.0.k.next", k_all, cache_of=kc)
        b.output("cache.0.v.next", v_all, cache_of=vc)
        o = b.op("attention.mla_sparse" if sparse else "attention.mla", b.concat(q_nope, q_pe, dim=-1), k_all, v_all,
                 *extra, scale=0.3)
    else:
        q_lat = b.einsum(q_nope, b.param("kv_b_proj.w_uk", (h, dn, c)), equation="bshd,hdc->bshc")
        lc = b.cache_input("cache.0.latent", ("B", "T", c + dr))
        latent = b.cache.append(lc, b.concat(c_kv, b.reshape(k_pe, shape=("B", "S", dr)), dim=-1))
        b.output("cache.0.latent.next", latent, cache_of=lc)
        o = b.op("attention.mla_sparse_absorbed" if sparse else "attention.mla_absorbed",
                 b.concat(q_lat, q_pe, dim=-1), latent, *extra, scale=0.3, kv_lora_rank=c)
        o = b.einsum(o, b.param("kv_b_proj.w_uv", (h, dv, c)), equation="bshc,hdc->bshd")
    b.output("y", b.linear(b.reshape(o, shape=("B", "S", h * dv)), b.param("o_proj.weight", (D, h * dv))))
    return b.build()


def test_absorb_mla_switches_to_the_latent_cache():
    golden("absorb_mla", lambda b: mla_block(b, False), lambda b: mla_block(b, True))


def test_absorb_mla_keeps_the_sparse_form():
    """V3.2: attention.mla_sparse over per-head K/V -> attention.mla_sparse_absorbed over the latent cache, the
    same selected positions."""
    golden("absorb_mla", lambda b: mla_block(b, False, sparse=True), lambda b: mla_block(b, True, sparse=True))


def test_absorb_mla_premultiplied_and_fp8_kv_b():
    g = mla_block(GraphBuilder("g"), False)
    w = rand_weights(g)
    res = passes.check(["absorb_mla", "absorb_mla_premultiplied"], g, w).raise_if_failed()
    assert set(res.records[1].params_added) == {"q_proj.absorbed", "o_proj.absorbed"}
    # the same block with an FP8 kv_b_proj: absorption dequantises what it folds
    b = GraphBuilder("fp8")
    ws = dict(w)
    q8, s8 = quantize_fp8_block(ws.pop("kv_b_proj.weight"), (4, 4))
    ws.update({"kv_b_proj.weight": q8, "kv_b_proj.weight_scale_inv": s8})
    orig = GraphBuilder.param

    def param(self, name, shape, dtype=None):
        if name != "kv_b_proj.weight":
            return orig(self, name, shape, dtype)
        return self.dequant_fp8(orig(self, name, shape, "float8_e4m3fn"),
                                orig(self, "kv_b_proj.weight_scale_inv", (-(-shape[0] // 4), -(-shape[1] // 4)),
                                     "float32"), block=(4, 4))

    GraphBuilder.param = param
    try:
        g8 = mla_block(b, False)
    finally:
        GraphBuilder.param = orig
    passes.check(["absorb_mla"], g8, WeightStore(ws)).raise_if_failed()


def test_legalize_lowers_to_primitives_and_keeps_what_it_is_told():
    def before(b):
        x = tokens(b)
        b.output("y", b.norm.rms(b.silu(x), b.param("n.weight", (D,)), eps=1e-5))
        return b.build()

    def after(b):
        x = b.silu(tokens(b))
        xf = b.cast(x, dtype="float32")
        ms = b.mean(b.mul(xf, xf), dims=(-1,), keepdim=True)
        y = b.mul(xf, b.rsqrt(b.add(ms, b.constant(value=1e-5))))
        b.output("y", b.mul(b.cast(y, dtype="float32"), b.param("n.weight", (D,))))
        return b.build()

    golden("legalize", before, after)
    g = before(GraphBuilder("g"))
    kept, _, _ = passes.run_pipeline(g, rand_weights(g), [("legalize", {"keep": {"norm.rms"}})])
    passes.assert_structural_equal(kept, g)


def test_group_moe_keeps_mxfp4_experts_mxfp4():
    """V4's dequant_mxfp4 experts stack as packed rows + e8m0 scales under one dequant_mxfp4 (what the triton
    backend's MXFP4 fused MoE reads), numerically the per-expert MoE."""
    d = i = 32

    def graph(b, grouped):
        x = b.input("x", ("N", d), "float32")
        w, idx = b.input("w", ("N", K), "float32"), b.input("idx", ("N", K), "int64")

        def fp4(name, rows, cols):
            return b.dequant_mxfp4(b.param(f"{name}.weight", (rows, cols // 2), "int8"),
                                   b.param(f"{name}.scale", (rows, cols // 32), "uint8"))
        if grouped:
            gu = b.reshape(fp4("ffn.experts.gate_up_proj", E * 2 * i, d), shape=(E, 2 * i, d))
            dn = b.reshape(fp4("ffn.experts.down_proj", E * d, i), shape=(E, d, i))
            xp, order, offsets = b.moe.permute(x, idx, num_experts=E)
            h = b.act.swiglu_clamped(b.moe.grouped_gemm(xp, gu, offsets), limit=0.5)
            b.output("y", b.moe.unpermute(b.moe.grouped_gemm(h, dn, offsets), w, order))
        else:
            ws = [fp4(f"ffn.experts.{e}.{p}", *shape) for e in range(E)
                  for p, shape in (("w1", (i, d)), ("w3", (i, d)), ("w2", (d, i)))]
            b.output("y", b.moe.experts_clamped(x, w, idx, *ws, num_experts=E, limit=0.5))
        return b.build()

    before, g = graph(GraphBuilder("g"), False), torch.Generator().manual_seed(3)
    weights = WeightStore({n: torch.randint(-128, 128, v.type.concrete({}), generator=g, dtype=torch.int8)
                           if v.type.dtype == "int8" else torch.randint(122, 128, v.type.concrete({}), generator=g,
                                                                        dtype=torch.uint8)
                           for n, v in before.params().items()})
    after, w2, _ = passes.run_pipeline(before, weights, ["group_moe", "dce"])   # dce: the per-expert dequants
    passes.assert_structural_equal(after, graph(GraphBuilder("g"), True))
    assert w2["ffn.experts.down_proj.scale"].view(E, d, 1)[1].equal(weights["ffn.experts.1.w2.scale"])
    x = torch.randn(5, d, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(5)])
    passes.check(["group_moe"], before, weights, inputs={"x": x, "w": torch.rand(5, K, generator=g),
                                                         "idx": ids}).raise_if_failed()


def test_fuse_mla_rows_makes_the_row_and_query_ops():
    """The cache row and the absorbed query as absorb_mla leaves them -> mla.latent_row, mla.query_absorbed."""
    rope = {"interleaved": True}

    def inputs(b):
        c, k = b.input("c", ("B", "S", 8), "float32"), b.input("k", ("B", "S", 4), "float32")
        qn, qp = b.input("qn", ("B", "S", 2, 6), "float32"), b.input("qp", ("B", "S", 2, 4), "float32")
        return c, k, qn, qp, b.input("positions", ("B", "S"), "int64"), b.param("nw", (8,)), b.param("w_uk", (2, 6, 8))

    def before(b):
        c, k, qn, qp, pos, nw, w_uk = inputs(b)
        roped = b.rope(b.reshape(k, shape=("B", "S", 1, 4)), pos, **rope)
        b.output("row", b.concat(b.norm.rms(c, nw), b.reshape(roped, shape=("B", "S", 4)), dim=-1))
        b.output("q", b.concat(b.einsum(qn, w_uk, equation="bshd,hdc->bshc"), b.rope(qp, pos, **rope), dim=-1))
        return b.build()

    def after(b):
        c, k, qn, qp, pos, nw, w_uk = inputs(b)
        b.output("row", b.mla.latent_row(c, k, nw, pos, eps=1e-6, **rope))
        b.output("q", b.mla.query_absorbed(qn, qp, w_uk, pos, **rope))
        return b.build()
    golden("fuse_mla_rows", before, after)
