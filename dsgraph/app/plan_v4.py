"""`dsgraph plan` for DeepSeek-V4 (Flash, Pro): the same table as plan.py's, sized from the model's params and
config, since the shard pass has no V4 rules yet (its attention, hyper-connection and hash-routing ops).

  weights per GPU  every param in its stored dtype (FP8 attention, MXFP4 routed experts with their e8m0 scales),
                   by role: routed experts / ep (or / tp without EP); the head-split attention projections
                   (wq_b, wo_a, wo_b: heads and output groups), shared experts, embedding and head / tp; the rest
                   (wq_a, the one KV head's wkv, compressors, indexer, router, hyper-connections, norms) whole
  KV per GPU       the graph's own caches at the context length, in bf16: V4's compact layout, a sliding window
                   and compressor state per layer, plus per token of context head_dim / m compressed entries
                   (m = 4 for CSA, with the indexer's keys, 128 for HCA); one KV head, so TP keeps every
                   request's cache and DP attention 1/dp
  collectives      per layer: TP's all-reduce of the attention output and of the MoE output [tokens, hidden] (two
                   when tp < world without DP attention: shared experts over the TP group, routed over all);
                   DP attention + EP: a dispatch and a combine all-to-all of the rank's routed copies (k/tp per
                   token) [copies, hidden] plus their expert ids; the embedding's all-reduce, the head's all-gather
  compute          as plan.py: weights read (experts by the chance the batch touches them) + KV over HBM; 2 x
                   weight values x tokens over FP8 peak
"""
from __future__ import annotations

from dsgraph import models
from dsgraph.errors import ConfigError
from dsgraph.parallel import ParallelPlan

from . import plan as base

TP_SPLIT = ("attn.wq_b.", "attn.wo_a.", "attn.wo_b.", "ffn.shared_experts.", "embed.", "head.")
BF16 = 2


def is_v4(model) -> bool:
    return getattr(model.config, "family", "") == "v4"


def _check(c, plan: ParallelPlan, name: str) -> None:
    for key, size, by in (("num_attention_heads", c.num_attention_heads, plan.tp), ("o_groups", c.o_groups, plan.tp),
                          ("vocab_size", c.vocab_size, plan.tp), ("moe_intermediate_size", c.moe_intermediate_size,
                                                                   plan.tp),
                          ("n_routed_experts", c.n_routed_experts, plan.ep)):
        if size % by:
            raise ConfigError(f"{plan} does not divide {key}={size} of {name} into {by} equal parts")


def _weights(model, plan: ParallelPlan) -> tuple[dict, dict]:
    """({role: bytes this rank holds}, {role: weight values this rank holds}); roles 'experts' and 'dense'."""
    held, values = {"experts": 0.0, "dense": 0.0}, {"experts": 0.0, "dense": 0.0}
    for name, v in model.graph.params().items():
        b = v.type.nbytes({})
        n = v.type.numel({}) * (2 if v.type.dtype == "int8" else 1) if v.type.dtype != "uint8" else 0
        if ".ffn.experts." in name:
            by, role = (plan.ep if plan.ep > 1 else plan.tp), "experts"
        else:
            by, role = (plan.tp if any(k in name for k in TP_SPLIT) else 1), "dense"
        held[role] += b / by
        values[role] += n / by
    return held, values


def _collectives(c, plan: ParallelPlan, tokens: int, gpu: base.GPU, nodes: int) -> tuple[dict, float, float]:
    """({op: payload bytes}, bytes moved per GPU, seconds) of one step of `tokens` tokens on this rank."""
    h, layers, tp, world = c.hidden_size, c.num_hidden_layers, plan.tp, plan.world
    calls = []  # (op, payload bytes, group size)
    if tp > 1:
        calls += [("dist.all_reduce", tokens * h * BF16, tp)] * (layers + 1)  # attention outputs, embedding
        calls.append(("dist.all_gather", tokens * c.vocab_size // tp * 4, tp))  # fp32 logits
    if plan.dp_attention:
        copies = tokens * max(1, c.num_experts_per_tok // tp)
        calls += [("dist.all_to_all", copies * (h * BF16 + 8), world), ("dist.all_to_all", copies * h * BF16, world)] \
            * layers
        if tp > 1:
            calls += [("dist.all_reduce", tokens * h * BF16, tp)] * layers
    elif world > 1:
        calls += [("dist.all_reduce", tokens * h * BF16, world)] * layers
        if tp < world and tp > 1:
            calls += [("dist.all_reduce", tokens * h * BF16, tp)] * layers  # shared experts over the TP group
    payload: dict[str, float] = {}
    link = secs = 0.0
    for op, b, size in calls:
        payload[op] = payload.get(op, 0) + b
        span = nodes if size == world else max(1, size // gpu.gpus_per_node)
        moved, t = base._link_time(op, b, size, gpu, span)
        link, secs = link + moved, secs + t
    return payload, link, secs


def _kv_bytes(graph, sequences: int, context: int) -> float:
    """The caches of `sequences` requests at `context` tokens, in bf16, from the graph's cache types."""
    return sum(v.type.numel({"B": sequences, "T": context}) for v in graph.caches().values()) * BF16


def _step(c, graph, plan, held, values, gpu, nodes, batch: int, seq: int, context: int) -> base.StepCost:
    local = max(1, batch // plan.dp)
    tokens = local * seq
    payload, link, comm = _collectives(c, plan, tokens, gpu, nodes)
    k, e = c.num_experts_per_tok, c.n_routed_experts
    touched = 1 - (1 - k / e) ** (batch * seq)
    read = held["dense"] + held["experts"] * touched + _kv_bytes(graph, local, context)
    per_expert = values["experts"] / (e / plan.ep if plan.ep > 1 else e)
    copies = batch * seq * k * (1 / plan.ep if plan.ep > 1 else 1)
    flops = 2 * values["dense"] * tokens + 2 * per_expert * copies
    return base.StepCost(batch * seq, payload, link, comm, read / (gpu.hbm_gbs * 1e9), flops / (gpu.fp8_tflops * 1e12))


def plan_v4(name: str, gpus: int, hw: base.GPU, nodes: int = 1, batch: int = 64, context: int = 4096,
            prefill: int = 4096, plans: list[ParallelPlan] | None = None, model=None) -> list[base.PlanRow]:
    if gpus % nodes or gpus // nodes > hw.gpus_per_node:
        raise ConfigError(f"{gpus} GPUs do not fit {nodes} node(s) of {hw.gpus_per_node} {hw.name} GPUs")
    model = model or models.build_model(name, weights=False, mtp=False, dtype="bfloat16")
    c, rows = model.config, []
    for plan in plans or base.candidate_plans(c, gpus, nodes):
        _check(c, plan, name)
        held, values = _weights(model, plan)
        weights = held["dense"] + held["experts"]
        kv = _kv_bytes(model.graph, max(1, batch // plan.dp), context)
        pre_tokens = prefill  # one prompt per attention group
        act = base.ACTIVATION_FACTOR * max(pre_tokens * c.hc_mult * c.hidden_size * 4,
                                           pre_tokens * c.vocab_size // plan.tp * 4,
                                           pre_tokens * c.num_attention_heads // plan.tp * c.head_dim * BF16)
        dec = _step(c, model.graph, plan, held, values, hw, nodes, batch, 1, context)
        pre = _step(c, model.graph, plan, held, values, hw, nodes, plan.dp, prefill, prefill)
        total = (weights + kv + act) / 1e9
        rows.append(base.PlanRow(plan, weights / base.GiB, kv / base.GiB, act / base.GiB, dec, pre,
                                 total <= 0.95 * hw.memory_gb))
    return rows


def plan_any(name: str, gpus: int, hw: base.GPU, nodes: int = 1, batch: int = 64, context: int = 4096,
             prefill: int = 4096) -> list[base.PlanRow]:
    """plan.py's planner, or this one for a V4 model."""
    model = models.build_model(name, weights=False, mtp=False, dtype="bfloat16")
    run = plan_v4 if is_v4(model) else base.plan_model
    return run(name, gpus, hw, nodes, batch, context, prefill, model=model)
