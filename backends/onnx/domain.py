"""ONNX converters for dsgraph's domain ops that have no decomposition (or whose
decomposition would be data-dependent): RoPE, attention, MLA projections, MoE
routing and experts, FP8 block weights, the KV-cache append.

Like the torch references, these compute in fp32 and cast the result to the node's
declared dtype (no-ops for fp32 graphs). `moe.experts` is exported in *dense* form —
every expert runs on every token and is weighted by its (mostly zero) gate — which is
exact but costs E/k times the expert FLOPs; ONNX has no grouped GEMM, and
data-dependent token dispatch would need a Loop per expert.
"""
from __future__ import annotations

from dsgraph.ops.rope import rope_frequencies

from .context import onnx_dtype
from .converters import arange, causal_mask, linear, silu
from .registry import TABLE, converted


def f32(ctx, x: str, dtype: str) -> str:
    return x if dtype in ("float32", "float64") else ctx.emit("Cast", [x], "f32", to=onnx_dtype("float32"))


def cast(ctx, x: str, dtype: str) -> str:
    return x if dtype == "float32" else ctx.emit("Cast", [x], "cast", to=onnx_dtype(dtype))


def rms(ctx, x: str, w: str, eps: float, dtype: str) -> str:
    """rms_norm_ref: fp32 x * rsqrt(mean(x^2) + eps), cast to x's dtype, times fp32 weight."""
    xf = f32(ctx, x, dtype)
    ms = ctx.emit("ReduceMean", [ctx.emit("Mul", [xf, xf], "sq"), ctx.ints([-1])], "ms", keepdims=1)
    inv = ctx.emit("Reciprocal", [ctx.emit("Sqrt", [ctx.emit("Add", [ms, ctx.const(eps)], "ms_eps")], "rms")], "inv")
    y = ctx.emit("Mul", [xf, inv], "normed")
    if dtype != "float32":
        y = f32(ctx, cast(ctx, y, dtype), dtype)
    return ctx.emit("Mul", [f32(ctx, w, dtype), y], "rms_out")


# ---------------------------------------------------------------- rope and cache
@TABLE.register("rope")
def _rope(ctx, node):
    ins = ctx.inputs(node)
    xt = node.inputs[0].type
    dim, rank = xt.shape[-1], xt.rank
    inv_freq, mult = rope_frequencies(node.attrs, dim)
    pos = ctx.emit("Cast", [ins[1]], "pos_f", to=onnx_dtype("float32"))
    freqs = ctx.emit("Mul", [ctx.emit("Unsqueeze", [pos, ctx.ints([-1])], "pos_col"), ctx.const(inv_freq)], "freqs")
    cos, sin = ctx.emit("Cos", [freqs], "cos"), ctx.emit("Sin", [freqs], "sin")
    if mult != 1.0:
        cos, sin = ctx.emit("Mul", [cos, ctx.const(mult)], "cos_m"), ctx.emit("Mul", [sin, ctx.const(mult)], "sin_m")
    if rank > 3:  # [B, S, D/2] -> [B, S, 1, ..., D/2]
        axes = ctx.ints(list(range(2, rank - 1)))
        cos, sin = ctx.emit("Unsqueeze", [cos, axes], "cos_b"), ctx.emit("Unsqueeze", [sin, axes], "sin_b")
    x = f32(ctx, ins[0], xt.dtype)
    if node.attrs["interleaved"]:
        pairs = ctx.emit("Reshape", [x, ctx.ints([0] * (rank - 1) + [dim // 2, 2])], "pairs")
        x1, x2 = ctx.emit("Split", [pairs, ctx.ints([1, 1])], "pair", outputs=2, axis=-1)
        last = ctx.ints([-1])
        cos, sin = ctx.emit("Unsqueeze", [cos, last], "cos_p"), ctx.emit("Unsqueeze", [sin, last], "sin_p")
    else:
        x1, x2 = ctx.emit("Split", [x, ctx.ints([dim // 2, dim // 2])], "half", outputs=2, axis=-1)
    o1 = ctx.emit("Sub", [ctx.emit("Mul", [x1, cos], "x1c"), ctx.emit("Mul", [x2, sin], "x2s")], "rot1")
    o2 = ctx.emit("Add", [ctx.emit("Mul", [x2, cos], "x2c"), ctx.emit("Mul", [x1, sin], "x1s")], "rot2")
    out = ctx.emit("Concat", [o1, o2], "rope", axis=-1)
    if node.attrs["interleaved"]:
        out = ctx.emit("Reshape", [out, ctx.ints([0] * (rank - 1) + [dim])], "rope_flat")
    return converted(cast(ctx, out, xt.dtype))


@TABLE.register("cache.append")
def _cache_append(ctx, node):
    ins = ctx.inputs(node)
    return converted(ctx.emit("Concat", ins, "cache_next", axis=1))


# ---------------------------------------------------------------- attention
def _softmax_attention(ctx, scores: str, q: str, k: str, scale: float, causal: bool) -> str:
    s = ctx.emit("Mul", [scores, ctx.const(scale)], "scaled")
    if causal:
        s = ctx.emit("Where", [causal_mask(ctx, q, 1, k, 1), s, ctx.const(float("-inf"))], "masked")
    return ctx.emit("Softmax", [s], "probs", axis=-1)


@TABLE.register("attention.gqa", "attention.mla")
def _attention(ctx, node):
    """Grouped heads without repeating K/V: q [B,S,Hkv*rep,D] is viewed as [B,S,Hkv,rep,D]."""
    ins = ctx.inputs(node)
    qt, kt, vt = (v.type for v in node.inputs)
    hq, hkv, d, dv = qt.shape[2], kt.shape[2], qt.shape[3], vt.shape[3]
    q, k, v = (f32(ctx, x, qt.dtype) for x in ins)
    q5 = ctx.emit("Reshape", [q, ctx.ints([0, 0, hkv, hq // hkv, d])], "q_grouped")
    scores = ctx.emit("Einsum", [q5, k], "scores", equation="bsgrd,btgd->bgrst")
    p = _softmax_attention(ctx, scores, ins[0], ins[1], node.attrs["scale"], node.attrs["causal"])
    o = ctx.emit("Einsum", [p, v], "attn", equation="bgrst,btgd->bsgrd")
    return converted(cast(ctx, ctx.emit("Reshape", [o, ctx.ints([0, 0, hq, dv])], "attn_out"), qt.dtype))


@TABLE.register("attention.mla_absorbed")
def _mla_absorbed(ctx, node):
    ins = ctx.inputs(node)
    qt = node.inputs[0].type
    q, cache = (f32(ctx, x, qt.dtype) for x in ins)
    scores = ctx.emit("Einsum", [q, cache], "scores", equation="bshd,btd->bhst")
    p = _softmax_attention(ctx, scores, ins[0], ins[1], node.attrs["scale"], node.attrs["causal"])
    c = node.attrs["kv_lora_rank"]
    v = ctx.emit("Slice", [cache, ctx.ints([0]), ctx.ints([c]), ctx.ints([2])], "latent_v")
    return converted(cast(ctx, ctx.emit("Einsum", [p, v], "attn", equation="bhst,btc->bshc"), qt.dtype))


# ---------------------------------------------------------------- MLA projections
@TABLE.register("mla.latent_proj")
def _latent_proj(ctx, node):
    ins = ctx.inputs(node)
    dt = node.inputs[0].type.dtype
    a = node.attrs
    kv = cast(ctx, linear(ctx, f32(ctx, ins[0], dt), f32(ctx, ins[1], dt)), dt)
    rope = node.outputs[1].type.shape[-1]
    c, k_pe = ctx.emit("Split", [kv, ctx.ints([a["kv_lora_rank"], rope])], "kv_a", outputs=2, axis=-1)
    return converted([cast(ctx, rms(ctx, c, ins[2], a["eps"], dt), dt), k_pe])


@TABLE.register("mla.decompress")
def _decompress(ctx, node):
    ins = ctx.inputs(node)
    dt = node.inputs[0].type.dtype
    a = node.attrs
    h, dn, dv = a["num_heads"], a["qk_nope_dim"], a["v_dim"]
    kv = cast(ctx, linear(ctx, f32(ctx, ins[0], dt), f32(ctx, ins[2], dt)), dt)
    kv = ctx.emit("Reshape", [kv, ctx.ints([0, 0, h, dn + dv])], "kv_heads")
    k_nope, v = ctx.emit("Split", [kv, ctx.ints([dn, dv])], "kv_b", outputs=2, axis=-1)
    k_pe = ctx.emit("Expand", [ins[1], ctx.ints([1, 1, h, 1])], "k_pe_heads")
    return converted([ctx.emit("Concat", [k_nope, k_pe], "k", axis=-1), v])


# ---------------------------------------------------------------- MoE
def _route(ctx, logits: str, bias: str | None, a: dict, n_experts: int):
    scores = ctx.emit("Softmax" if a["scoring"] == "softmax" else "Sigmoid", [logits], "scores",
                      **({"axis": -1} if a["scoring"] == "softmax" else {}))
    choice = ctx.emit("Add", [scores, bias], "biased") if bias else scores
    if a["method"] != "greedy":
        g = a["n_group"]
        grouped = ctx.emit("Reshape", [choice, ctx.ints([0, g, n_experts // g])], "grouped")
        if a["method"] == "group_limited":
            gs = ctx.emit("ReduceMax", [grouped, ctx.ints([-1])], "group_score", keepdims=0)
        else:
            top2 = ctx.emit("TopK", [grouped, ctx.ints([2])], "group_top2", outputs=2, axis=-1)[0]
            gs = ctx.emit("ReduceSum", [top2, ctx.ints([-1])], "group_score", keepdims=0)
        keep = ctx.emit("TopK", [gs, ctx.ints([a["topk_group"]])], "keep", outputs=2, axis=-1)[1]
        zeros = ctx.emit("Mul", [gs, ctx.const(0.0)], "zeros")
        ones = ctx.emit("Add", [ctx.emit("GatherElements", [zeros, keep], "z", axis=1), ctx.const(1.0)], "ones")
        mask = ctx.emit("ScatterElements", [zeros, keep, ones], "group_mask", axis=1)
        mask = ctx.emit("Expand", [ctx.emit("Unsqueeze", [mask, ctx.ints([-1])], "gm"),
                                   ctx.ints([1, 1, n_experts // g])], "gm_e")
        mask = ctx.emit("Reshape", [mask, ctx.ints([0, n_experts])], "expert_mask")
        keep_b = ctx.emit("Greater", [mask, ctx.const(0.5)], "keep_b")
        choice = ctx.emit("Where", [keep_b, choice, ctx.const(float("-inf"))], "choice")
    idx = ctx.emit("TopK", [choice, ctx.ints([a["top_k"]])], "topk", outputs=2, axis=-1)[1]
    w = ctx.emit("GatherElements", [scores, idx], "gates", axis=1)
    if a["top_k"] > 1 and a["norm_topk_prob"]:
        denom = ctx.emit("Add", [ctx.emit("ReduceSum", [w, ctx.ints([-1])], "gsum", keepdims=1),
                                 ctx.const(1e-20)], "gden")
        w = ctx.emit("Div", [w, denom], "gates_norm")
    if a["routed_scaling_factor"] != 1.0:
        w = ctx.emit("Mul", [w, ctx.const(a["routed_scaling_factor"])], "gates_scaled")
    return [w, idx]


@TABLE.register("moe.route")
def _moe_route(ctx, node):
    ins = ctx.inputs(node)
    dt = node.inputs[0].type.dtype
    bias = f32(ctx, ins[1], dt) if len(ins) > 1 else None
    return converted(_route(ctx, f32(ctx, ins[0], dt), bias, node.attrs, node.inputs[0].type.shape[1]))


@TABLE.register("moe.gate")
def _moe_gate(ctx, node):
    ins = ctx.inputs(node)
    dt = node.inputs[0].type.dtype
    logits = linear(ctx, f32(ctx, ins[0], dt), f32(ctx, ins[1], dt))
    bias = f32(ctx, ins[2], dt) if len(ins) > 2 else None
    return converted(_route(ctx, logits, bias, node.attrs, node.inputs[1].type.shape[0]))


@TABLE.register("moe.experts")
def _moe_experts(ctx, node):
    """Dense experts: stack [E, D, I] gate/up and [E, I, D] down, run all, weight by the one-hot gates."""
    ins = ctx.inputs(node)
    dt = node.inputs[0].type.dtype
    e = node.attrs["num_experts"]
    x, weights, indices, ws = f32(ctx, ins[0], dt), ins[1], ins[2], ins[3:]
    zero = ctx.ints([0])

    def stack(j, hint):
        mats = [ctx.emit("Unsqueeze", [ctx.emit("Transpose", [f32(ctx, ws[3 * i + j], dt)], "wT", perm=[1, 0]),
                                       zero], hint) for i in range(e)]
        return ctx.emit("Concat", mats, f"{hint}_stack", axis=0)

    gate = ctx.emit("MatMul", [x, stack(0, "gate")], "ex_gate")          # [E, N, I]
    up = ctx.emit("MatMul", [x, stack(1, "up")], "ex_up")
    h = cast(ctx, ctx.emit("Mul", [silu(ctx, gate), up], "ex_h"), dt)
    y = ctx.emit("MatMul", [f32(ctx, h, dt), stack(2, "down")], "ex_out")   # [E, N, D]
    experts = ctx.emit("Reshape", [arange(ctx, ctx.ints([e]), "expert_ids"), ctx.ints([e, 1, 1])], "eid")
    hit = ctx.emit("Equal", [ctx.emit("Unsqueeze", [indices, zero], "idx_e"), experts], "hit")   # [E, N, k]
    gates = ctx.emit("Mul", [ctx.emit("Cast", [hit], "hit_f", to=onnx_dtype("float32")),
                             ctx.emit("Unsqueeze", [weights, zero], "w_e")], "dense_w")
    gates = ctx.emit("ReduceSum", [gates, ctx.ints([2])], "expert_gate", keepdims=1)          # [E, N, 1]
    out = ctx.emit("ReduceSum", [ctx.emit("Mul", [y, gates], "weighted"), zero], "routed", keepdims=0)
    return converted(cast(ctx, out, dt))


# ---------------------------------------------------------------- FP8 block weights
def dequant_fp8(ctx, w: str, s: str, shape, block) -> str:
    n, k = shape
    bn, bk = block
    sn, sk = -(-n // bn), -(-k // bk)
    wf = ctx.emit("Cast", [w], "w_f32", to=onnx_dtype("float32"))
    scale = ctx.emit("Unsqueeze", [s, ctx.ints([1, 3])], "s4")
    scale = ctx.emit("Expand", [scale, ctx.ints([sn, bn, sk, bk])], "s_blk")
    scale = ctx.emit("Reshape", [scale, ctx.ints([sn * bn, sk * bk])], "s_full")
    if (sn * bn, sk * bk) != (n, k):
        scale = ctx.emit("Slice", [scale, ctx.ints([0, 0]), ctx.ints([n, k]), ctx.ints([0, 1])], "s_edge")
    return ctx.emit("Mul", [wf, scale], "dequant")


@TABLE.register("dequant_fp8")
def _dequant_fp8(ctx, node):
    ins = ctx.inputs(node)
    return converted(dequant_fp8(ctx, ins[0], ins[1], node.inputs[0].type.shape, node.attrs["block"]))


@TABLE.register("linear_fp8")
def _linear_fp8(ctx, node):
    ins = ctx.inputs(node)
    dt = node.inputs[0].type.dtype
    w = dequant_fp8(ctx, ins[1], ins[2], node.inputs[1].type.shape, node.attrs["block"])
    return converted(cast(ctx, linear(ctx, f32(ctx, ins[0], dt), w), dt))
