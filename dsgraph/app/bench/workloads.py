"""What the bench measures: op-level graphs built with a model's real dims, and the
model-level prefill and decode steps.

Op workloads are small graphs built with the same `DecoderBuilder` code the models
use (so a MoE layer here is exactly a model's MoE layer), compiled by every backend
through the same path as a model. Each carries its shape environment (B, S, T), its
FLOPs and bytes (for the roofline floor) and the tokens one call processes.

Shapes: decode-shaped workloads (mla_decode / dsa_decode / gqa_decode, moe, decode) run at every
`batch` x `context`; prefill-shaped ones (prefill_attention, rmsnorm, rope, fp8_gemm,
prefill) at every `prefill_batch` x `context` tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsgraph.builder import GraphBuilder
from dsgraph.dtypes import itemsize, to_torch
from dsgraph.models import quantize_fp8_block, random_weights
from dsgraph.models.builder import DecoderBuilder
from dsgraph.models.random_weights import random_tensor
from dsgraph.weights import WeightStore

OP_WORKLOADS = ("mla_decode", "dsa_decode", "gqa_decode", "prefill_attention", "moe", "rmsnorm", "rope", "fp8_gemm")
MODEL_WORKLOADS = ("prefill", "decode")
ALL_WORKLOADS = OP_WORKLOADS + MODEL_WORKLOADS + ("speculative",)
DEFAULT_WORKLOADS = OP_WORKLOADS + MODEL_WORKLOADS  # speculative generation is long: asked for by name
DECODE_SHAPED = ("mla_decode", "dsa_decode", "gqa_decode", "moe", "decode")


@dataclass
class Workload:
    name: str
    level: str                      # "op" | "model"
    env: dict                       # symbol bindings: B, S, T
    tokens: int                     # tokens one call processes (throughput = tokens / time)
    flops: float
    bytes: float
    graph: object = None            # op level only; model level compiles the model
    weights: object = None
    notes: list = field(default_factory=list)

    @property
    def batch(self) -> int:
        return self.env["B"]

    @property
    def context(self) -> int:
        return self.env.get("T", 0) or self.env.get("S", 0)

    @property
    def label(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.env.items() if k != "T" or v)
        return f"{self.name} {dims}"


def applicable(name: str, cfg) -> str | None:
    """None if workload `name` applies to the model, else why not."""
    if name == "mla_decode" and not cfg.is_mla:
        return "the model has no MLA attention (use gqa_decode)"
    if name == "gqa_decode" and cfg.is_mla:
        return "the model uses MLA attention (use mla_decode)"
    if name == "dsa_decode" and not cfg.is_dsa:
        return "the model has no DeepSeek Sparse Attention (V3.2's indexer)"
    if name == "moe" and not cfg.is_moe:
        return "the model has no MoE layers"
    if name == "speculative" and not cfg.num_nextn_predict_layers:
        return "the model has no MTP module to draft with"
    return None


def _builder(cfg, dtype, name):
    return DecoderBuilder(cfg, dtype, name=name, mtp=False)


def _finish(db, outputs, seed, device):
    for name, v in outputs.items():
        db.b.output(name, v)
    graph = db.b.build()
    return graph, random_weights(graph, seed, device)  # drawn where they run: V3's 256 experts are 11 G values


def build_op(name: str, cfg, dtype: str, env: dict, seed: int = 0, device: str = "cpu") -> Workload:
    """One op-level workload at shape `env` ({"B":..., "S":..., "T":...}), its weights drawn on `device`."""
    es = itemsize(dtype)
    db = _builder(cfg, dtype, f"bench_{name}")
    b, d = db.b, cfg.hidden_size
    B, S, T = env["B"], env.get("S", 1), env.get("T", 0)
    if name == "mla_decode":
        h, w, c = cfg.num_attention_heads, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank
        q, cache = b.input("q", ("B", 1, h, w), dtype), b.input("cache", ("B", "T", w), dtype)
        out = b.attention.mla_absorbed(q, cache, scale=db.mla_scale(), kv_lora_rank=c)
        flops, nbytes = 2 * B * h * T * (w + c), es * (B * T * w + 2 * B * h * w)
        graph, weights = _finish(db, {"out": out}, seed, device)
        return Workload(name, "op", {"B": B, "T": T}, B, flops, nbytes, graph, weights)
    if name in ("gqa_decode", "prefill_attention"):
        s_q, s_k = (1, "T") if name == "gqa_decode" else ("S", "S")
        if cfg.is_mla:
            h = hkv = cfg.num_attention_heads
            dq, dv, scale = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim, db.mla_scale()
        else:
            h, hkv, dq = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attn_head_dim
            dv, scale = dq, dq ** -0.5
        q = b.input("q", ("B", s_q, h, dq), dtype)
        k, v = b.input("k", ("B", s_k, hkv, dq), dtype), b.input("v", ("B", s_k, hkv, dv), dtype)
        op = b.attention.mla if cfg.is_mla else b.attention.gqa
        graph, weights = _finish(db, {"out": op(q, k, v, scale=scale)}, seed, device)
        if name == "gqa_decode":
            return Workload(name, "op", {"B": B, "T": T}, B, 2 * B * h * T * (dq + dv),
                            es * (B * T * hkv * (dq + dv) + B * h * (dq + dv)), graph, weights)
        return Workload(name, "op", {"B": B, "S": S}, B * S, B * h * S * S * (dq + dv),  # causal: half of 2*S*S
                        es * B * S * (h * (2 * dq + dv) + h * dv) if cfg.is_mla else
                        es * B * S * (h * dq + hkv * (dq + dv) + h * dv), graph, weights)
    if name == "moe":
        x = b.input("x", ("B", "S", d), dtype)
        graph, weights = _finish(db, {"out": db.moe(x, "model.layers.1.mlp")}, seed, device)
        n = B * S
        e, k, i = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        shared = cfg.n_shared_experts or 0
        touched = e * (1 - (1 - k / e) ** n)   # expected distinct experts hit by n tokens
        flops = 2 * n * d * e + 2 * n * 3 * d * i * (k + shared)
        nbytes = 4 * d * e + es * (3 * d * i * (touched + shared) + 2 * n * d)
        return Workload(name, "op", {"B": B, "S": S}, n, flops, nbytes, graph, weights,
                        [f"{touched:.1f} of {e} experts touched on average"])
    if name == "rmsnorm":
        x = b.input("x", ("B", "S", d), dtype)
        graph, weights = _finish(db, {"out": db.norm(x, "model.norm", d)}, seed, device)
        return Workload(name, "op", {"B": B, "S": S}, B * S, 4 * B * S * d, es * (2 * B * S * d + d), graph, weights)
    if name == "rope":
        h = cfg.num_attention_heads
        r = cfg.qk_rope_head_dim if cfg.is_mla else cfg.attn_head_dim
        x, pos = b.input("x", ("B", "S", h, r), dtype), b.input("positions", ("B", "S"))
        graph, weights = _finish(db, {"out": b.rope(x, pos, **db.rope)}, seed, device)
        return Workload(name, "op", {"B": B, "S": S}, B * S, 6 * B * S * h * r, es * 2 * B * S * h * r + 8 * B * S,
                        graph, weights)
    if name == "fp8_gemm":
        return _fp8_gemm(cfg, dtype, env, seed, device)
    if name == "dsa_decode":
        return _dsa_decode(db, cfg, dtype, env, seed, device)
    raise KeyError(name)


def _dsa_decode(db, cfg, dtype, env, seed, device) -> Workload:
    """V3.2's decode attention beside mla_decode's dense one: the indexer's scores over the T cached keys, their
    top-k, and absorbed MLA over the selected latent rows (projections excluded, as in mla_decode)."""
    b, es = db.b, itemsize(dtype)
    B, T = env["B"], env["T"]
    h, w, c = cfg.num_attention_heads, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank
    hi, di, k = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    iq, ik = b.input("index_q", ("B", 1, hi, di), dtype), b.input("index_k", ("B", "T", di), dtype)
    idx = b.indexer.topk(b.indexer.logits(iq, ik, b.input("index_weights", ("B", 1, hi), "float32"),
                                          scale=di ** -0.5 * hi ** -0.5), k=k)
    q, cache = b.input("q", ("B", 1, h, w), dtype), b.input("cache", ("B", "T", w), dtype)
    out = b.attention.mla_sparse_absorbed(q, cache, idx, scale=db.mla_scale(), kv_lora_rank=c)
    sel = min(k, T)
    flops = 2 * B * hi * T * di + 2 * B * h * sel * (w + c)
    nbytes = es * (B * T * di + B * sel * w + 2 * B * h * w) + 4 * B * T   # + the fp32 scores
    graph, weights = _finish(db, {"out": out}, seed, device)
    return Workload("dsa_decode", "op", {"B": B, "T": T}, B, flops, nbytes, graph, weights,
                    [f"top-{k} of the T cached rows"])


def _fp8_gemm(cfg, dtype, env, seed, device) -> Workload:
    """linear_fp8 with the dense FFN's gate projection shape [intermediate, hidden] and the model's FP8 block."""
    block = tuple(cfg.fp8_block_size or (128, 128))
    n, k = cfg.intermediate_size, cfg.hidden_size
    b = GraphBuilder("bench_fp8_gemm", dtype)
    x = b.input("x", ("B", "S", k), dtype)
    w = b.param("w.weight", (n, k), "float8_e4m3fn")
    s = b.param("w.weight_scale_inv", (-(-n // block[0]), -(-k // block[1])), "float32")
    b.output("out", b.linear_fp8(x, w, s, block=block))
    q, scale = quantize_fp8_block(random_tensor("w.weight", (n, k), "float32", seed, device), block)
    m = env["B"] * env["S"]
    nbytes = n * k + 4 * scale.numel() + itemsize(dtype) * (m * k + m * n)
    return Workload("fp8_gemm", "op", {"B": env["B"], "S": env["S"]}, m, 2 * m * n * k, nbytes, b.build(),
                    WeightStore({"w.weight": q, "w.weight_scale_inv": scale}), [f"block {block}"])


def model_costs(cfg, summary, kind: str, env: dict) -> tuple[float, float]:
    """(FLOPs, bytes) of one prefill or decode step, approximately: weights touched once, MLA's
    latent cache (the smallest layout) read, attention FLOPs over the cache counted."""
    B, S, T = env["B"], env.get("S", 1), env.get("T", 0)
    n = B * S
    bpp = summary.param_bytes / max(summary.params, 1)
    expert = 0.0
    if cfg.is_moe:
        e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        expert = layers * per_expert * (e - e * (1 - (1 - k / e) ** n))   # experts no token touches
    embed = cfg.vocab_size * cfg.hidden_size
    weight_bytes = (summary.params - embed - expert) * bpp
    L, h = cfg.num_hidden_layers, cfg.num_attention_heads
    if cfg.is_mla:
        kv_per_tok = L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        attn_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    else:
        kv_per_tok = L * 2 * cfg.num_key_value_heads * cfg.attn_head_dim
        attn_dim = 2 * cfg.attn_head_dim
    es = bpp if bpp >= 2 else 2
    if kind == "prefill":
        attn = L * B * h * S * S * attn_dim
        return 2 * summary.activated_params * n + attn, weight_bytes + es * n * kv_per_tok
    attn = 2 * L * B * h * (T + S) * attn_dim
    return 2 * summary.activated_params * n + attn, weight_bytes + es * B * (T + S) * kv_per_tok


def inputs_nbytes(graph, env: dict) -> int:
    """Bytes of one set of `random_inputs(graph, env, ...)`, from the types alone (nothing allocated)."""
    full = {"T": 0, "S": 1, **env}
    return sum(v.type.nbytes(full) for v in graph.inputs.values() if v.kind != "param")


def random_inputs(graph, env: dict, seed: int, vocab: int | None = None, device="cpu") -> dict:
    """Fresh random inputs for every non-param input of `graph` at shape `env`, made on `device`.

    Token ids are uniform in the vocabulary, `positions` continue after T cached tokens,
    float inputs (activations, caches) are standard normal. On a GPU they are drawn there, in their own dtype:
    a full-size model's decode caches are gigabytes, too slow to draw on the host and copy.
    """
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    out = {}
    full = {"T": 0, "S": 1, **env}
    for name, v in graph.inputs.items():
        if v.kind == "param":
            continue
        shape = v.type.concrete(full)
        dt = to_torch(v.type.dtype)
        if name == "positions" or name.endswith(".positions"):
            t = torch.arange(full["T"], full["T"] + shape[1], device=dev).expand(shape).contiguous()
        elif not v.type.is_float:
            t = torch.randint(0, vocab or 2, shape, generator=g, device=dev)
        elif dev.type == "cpu":
            t = torch.randn(shape, generator=g).to(dt)
        else:
            t = torch.randn(shape, generator=g, device=dev, dtype=dt)
        out[name] = t
    return out
