"""Fusions written as patterns: residual add + RMSNorm, SwiGLU over one gate|up GEMM,
the two MLA down-projections that read the same input as one GEMM, router GEMM +
routing as one `moe.gate`, dequant + linear as one FP8 GEMM, and the query's RoPE folded
into the attention op."""
from __future__ import annotations

from dataclasses import dataclass

from dsgraph.ir import Graph
from dsgraph.pattern import ANY, P, Roots, Var
from dsgraph.rewriter import Rewrite, apply_rewrites
from dsgraph.weights import WeightStore

from .base import Pass, register
from .weightref import stack_rows, weight_ref

X, R, W, D = Var("x"), Var("r"), Var("w"), Var("d")


class PatternPass(Pass):
    """A pass that is a table of rewrites (built per run, so replacements can reach the weights)."""

    def rewrites(self, graph: Graph, weights: WeightStore) -> list[Rewrite]:
        raise NotImplementedError

    def run(self, graph: Graph, weights: WeightStore) -> dict:
        stats = apply_rewrites(graph, self.rewrites(graph, weights))
        stats["params_removed"] = len(graph.remove_unused_inputs(("param",)))
        return stats


def _add_rms(b, m):
    if m["x"].type != m["r"].type:
        return None  # a broadcasting add is not a residual add
    normed, total = b.norm.add_rms(m["x"], m["r"], m["w"], eps=m.attr("eps"))
    return {m.root_value: normed, m["sum"]: total}


@register
@dataclass
class FuseAddRMSNorm(PatternPass):
    """rms(x + r) -> norm.add_rms(x, r), whose second output replaces the sum (still the residual)."""

    name = "fuse_add_rmsnorm"
    description = "residual add + RMSNorm -> norm.add_rms"

    def rewrites(self, graph, weights):
        return [Rewrite("add_rms", P("norm.rms", P("add", X, R, name="sum", single_use=False), W, eps=ANY),
                        _add_rms)]


@register
@dataclass
class FuseSwiGLU(PatternPass):
    """mlp.swiglu(x, gate, up, down) -> linear(act.swiglu(linear(x, gate|up)), down), and V4's
    mlp.swiglu_clamped likewise with act.swiglu_clamped; the gate and up weights are concatenated lazily into
    `<prefix>.gate_up_proj` (FP8 stays FP8 when blocks align)."""

    name = "fuse_swiglu"
    description = "SwiGLU MLP (plain or clamped) -> one gate|up GEMM + act.swiglu(_clamped) + down GEMM"

    def rewrites(self, graph, weights):
        def build(b, m):
            g, u = weight_ref(m["g"]), weight_ref(m["u"])
            if g is None or u is None:
                return None
            prefix = g.base.rsplit(".", 1)[0]
            gu = b.linear(m["x"], stack_rows(b, weights, f"{prefix}.gate_up_proj", [g, u], m["x"].dtype))
            act = b.act.swiglu(gu) if m.root.op == "mlp.swiglu" else b.act.swiglu_clamped(gu, limit=m.attr("limit"))
            return {m.root_value: b.linear(act, m["d"])}

        return [Rewrite("swiglu", P("mlp.swiglu", X, Var("g"), Var("u"), D), build),
                Rewrite("swiglu_clamped", P("mlp.swiglu_clamped", X, Var("g"), Var("u"), D, limit=ANY), build)]


def _named(*leaves: str):
    """Var predicate: a weight (see weight_ref) whose checkpoint name ends in one of `leaves`."""
    return lambda v: (r := weight_ref(v)) is not None and r.base.endswith(leaves)


@register
@dataclass
class MergeQKVA(PatternPass):
    """The query projection that reads the attention input (q_a_proj with a q LoRA, as in V3; q_proj without, as in
    V2-Lite) and mla.latent_proj (kv_a_proj_with_mqa) read the same x: one GEMM over the stacked weight
    `<attn>.q_a_kv_a_proj` / `<attn>.q_kv_a_proj`, split into q | c_kv | k_pe, with kv_a_layernorm applied to
    c_kv. At decode that is one weight stream and one launch instead of two. A two-root pattern."""

    name = "merge_qkv_a"
    description = "q_a_proj / q_proj + kv_a_proj_with_mqa reading the same input -> one GEMM, split after"

    def rewrites(self, graph, weights):
        def build(b, m):
            x, kv, qa = m["x"], weight_ref(m["kv"]), weight_ref(m["wq"])
            if kv is None:
                return None
            prefix = kv.base.rsplit(".", 1)[0]
            leaf = qa.base.rsplit(".", 1)[1].removesuffix("_proj")
            w = stack_rows(b, weights, f"{prefix}.{leaf}_kv_a_proj", [qa, kv], x.dtype)
            c = m.attr("kv_lora_rank")
            q, c_kv, k_pe = b.split(b.linear(x, w), sizes=(qa.value.shape[0], c, kv.value.shape[0] - c), dim=-1)
            c_kv = b.norm.rms(c_kv, m["nw"], eps=m.attr("eps"))
            c_out, pe_out = m.root.outputs
            return {m["q"]: q, c_out: c_kv, pe_out: k_pe}

        latent = P("mla.latent_proj", X, Var("kv"), Var("nw"), kv_lora_rank=ANY, eps=ANY)
        query = P("linear", X, Var("wq", where=_named(".q_a_proj", ".q_proj")), name="q")
        return [Rewrite("qkv_a", Roots(latent, query), build)]


@register
@dataclass
class MergeQKV(PatternPass):
    """q_proj, k_proj and v_proj reading the same x (the LLaMA/Qwen2-shape models): one GEMM over the stacked
    weight `<attn>.qkv_proj`, split into q | k | v. Bias adds, where the checkpoint has them, stay on each part.
    At decode that is one weight stream and one launch instead of three. A three-root pattern."""

    name = "merge_qkv"
    description = "q_proj + k_proj + v_proj reading the same input -> one GEMM, split after"

    def rewrites(self, graph, weights):
        def build(b, m):
            refs = [weight_ref(m[f"w{p}"]) for p in "qkv"]
            prefix = {r.base.rsplit(".", 1)[0] for r in refs}
            if len(prefix) != 1:
                return None  # projections of different attention modules
            w = stack_rows(b, weights, f"{prefix.pop()}.qkv_proj", refs, m["x"].dtype)
            parts = b.split(b.linear(m["x"], w), sizes=tuple(r.value.shape[0] for r in refs), dim=-1)
            return dict(zip((m["q"], m["k"], m["v"]), parts))

        q, k, v = (P("linear", X, Var(f"w{p}", where=_named(f".{p}_proj")), name=p) for p in "qkv")
        return [Rewrite("qkv", Roots(q, k, v), build)]


def _gate(b, m):
    w, idx = b.moe.gate(m["x"], m["w"], *m["bias"], **m.root.attrs)
    return dict(zip(m.root.outputs, (w, idx)))


@register
@dataclass
class FuseRouter(PatternPass):
    """moe.route(linear([cast to fp32](x), gate_w)) -> moe.gate(x, gate_w): the router GEMM and the top-k
    selection as one region (moe.gate computes the GEMM in fp32, as the cast did)."""

    name = "fuse_router"
    description = "router linear + moe.route -> moe.gate"

    def rewrites(self, graph, weights):
        w32 = Var("w", where=lambda v: v.dtype == "float32")
        return [
            Rewrite("router_cast", P("moe.route", P("linear", P("cast", X, dtype="float32"), w32), rest="bias"),
                    _gate),
            Rewrite("router", P("moe.route", P("linear", X, w32), rest="bias"), _gate),
        ]


def _fp8(b, m):
    ref = weight_ref(m["w"])
    return {m.root_value: b.linear_fp8(m["x"], ref.w, ref.s, block=ref.block)}


@register
@dataclass
class FuseFP8Linear(PatternPass):
    """linear(x, [cast](dequant_fp8(w, s))) -> linear_fp8(x, w, s): a block-scaled FP8 GEMM for backends
    that have one (the weight is never dequantised in memory). The FP8 weight is what `weight_ref` recognises."""

    name = "fuse_fp8_linear"
    description = "linear over a dequantised FP8 weight -> linear_fp8"

    def rewrites(self, graph, weights):
        fp8 = Var("w", where=lambda v: (r := weight_ref(v)) is not None and r.s is not None)
        return [Rewrite("fp8", P("linear", X, fp8), _fp8)]


_ATTENTION = ("attention.gqa", "attention.mla", "attention.mla_absorbed", "attention.mla_sparse",
              "attention.mla_sparse_absorbed")


def _with_rope(b, m):
    att, rot = m.root, m["q"]
    q = rot if "keep" not in m else b.concat(m["keep"], rot, dim=-1)
    extra = {"kv_lora_rank": att.attrs["kv_lora_rank"]} if "kv_lora_rank" in att.attrs else {}
    out = b.op("attention.with_rope", q, m["pos"], *m["kv"], inner=att.op, rope_dims=rot.shape[-1],
               scale=att.attrs["scale"], causal=att.attrs["causal"], **extra, **m.node("rope").attrs)
    return {m.root_value: out}


@register
@dataclass
class FuseRoPEAttention(PatternPass):
    """attention(rope(q)) and attention(concat(q_keep, rope(q_rot))) (MLA's [nope | rope] query, naive or
    absorbed) -> attention.with_rope(q, positions, ...): the rotation becomes part of the attention op. Only
    the query: cached keys are stored rotated. Not in a default pipeline (no backend kernel applies RoPE on
    load yet; legalize decomposes the op back where a backend lacks it)."""

    name = "fuse_rope_attention"
    description = "RoPE on the query folded into the attention op -> attention.with_rope"

    def rewrites(self, graph, weights):
        rope = P("rope", Var("q"), Var("pos"), name="rope")
        tail = P("concat", Var("keep"), rope, dim=lambda d: d in (-1, 3))
        return [Rewrite("rope_q", P(_ATTENTION, rope, rest="kv"), _with_rope),
                Rewrite("rope_q_tail", P(_ATTENTION, tail, rest="kv"), _with_rope)]
