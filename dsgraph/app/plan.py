"""`dsgraph plan`: what a ParallelPlan costs on real GPUs, read off the sharded graph itself.

For each candidate plan of N GPUs the planner builds the model's graph without weights, runs the real shard pass
for rank 0 (then absorb_mla, so MLA caches are the latent), and evaluates that graph's types at a batch:
  memory per GPU   its params in their stored dtypes (FP8 stays 1 byte), its KV cache at the context length,
                   and activations (ACTIVATION_FACTOR x the largest intermediate: a working-set rule of thumb);
  collectives      the payload of every dist.* node of one decode / prefill step, the bytes a ring or all-to-all
                   then moves per GPU, and its time at the link bandwidth (one node: NVLink; several: a ring and
                   the cross-node share of an all-to-all run at the InfiniBand rate) plus a per-call latency;
  compute          weights read per step (each expert counted with the chance a token of the batch picks it)
                   and the KV cache read, over HBM bandwidth; 2 x params x tokens over peak FLOP/s;
  step time        max(memory, compute) + collectives (no overlap: a lower bound on tokens/s is the goal), and
                   tokens/s = tokens of the step / step time.
Attention's own FLOPs over the cache and kernel efficiency are not modelled; the numbers are bounds to compare
plans with, not predictions of a run. Hardware defaults are in `GPUS` (documented in docs/distributed.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from dsgraph import models
from dsgraph import passes as passlib
from dsgraph.dtypes import itemsize
from dsgraph.errors import ConfigError
from dsgraph.parallel import ParallelPlan
from dsgraph.symbolic import eval_dim

ACTIVATION_FACTOR = 8
GiB = 2**30


@dataclass(frozen=True)
class GPU:
    """One GPU's memory (GB), HBM bandwidth, links (GB/s per direction per GPU), dense peak TFLOP/s, latencies."""

    name: str
    memory_gb: float
    hbm_gbs: float
    nvlink_gbs: float = 450.0
    ib_gbs: float = 50.0
    bf16_tflops: float = 989.0
    fp8_tflops: float = 1979.0
    nvlink_latency_us: float = 10.0   # per collective call (NCCL's small-message all-reduce on one node)
    ib_latency_us: float = 25.0
    gpus_per_node: int = 8


GPUS = {"h200": GPU("h200", 141.0, 4800.0), "h100": GPU("h100", 80.0, 3350.0),
        "b200": GPU("b200", 192.0, 8000.0, nvlink_gbs=900.0, bf16_tflops=2250.0, fp8_tflops=4500.0)}


@dataclass
class StepCost:
    tokens: int
    payload_bytes: dict          # dist op -> bytes handed to it per step (rank 0)
    link_bytes: float            # bytes each GPU moves over its links per step
    comm_s: float
    memory_s: float
    compute_s: float

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s) + self.comm_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class PlanRow:
    plan: ParallelPlan
    weights_gib: float
    kv_gib: float
    activations_gib: float
    decode: StepCost
    prefill: StepCost
    fits: bool

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.kv_gib + self.activations_gib


def candidate_plans(cfg, gpus: int, nodes: int = 1) -> list[ParallelPlan]:
    """TP over all; with experts also TP+EP, DP attention + EP, and TP groups inside EP with DP attention (TP=2,
    and across nodes TP over each node's GPUs)."""
    plans = [ParallelPlan(tp=gpus)]
    if cfg.n_routed_experts:
        plans += [ParallelPlan(tp=gpus, ep=gpus), ParallelPlan(ep=gpus, dp_attention=True)]
        plans += [ParallelPlan(tp=t, ep=gpus, dp_attention=True) for t in sorted({2, gpus // nodes})
                  if 1 < t < gpus and gpus % t == 0]
    return plans


def rank_graph(model: models.Model, plan: ParallelPlan):
    """Rank 0's graph of `plan` (absorbed for MLA models), built and sharded without weights."""
    g, w, _ = passlib.run_pipeline(model.graph, model.weights, [("shard", {"plan": plan, "rank": 0})])
    if model.config.is_mla:
        g, w, _ = passlib.run_pipeline(g, w, ["absorb_mla"])
    return g


def _env(graph, plan: ParallelPlan, cfg, batch: int, seq: int, context: int) -> dict:
    """Symbol values of a step: this rank's batch, the new tokens, the cached ones, and each all_to_all's received
    rows at their expected count (the rows it sends: uniform routing)."""
    local = max(1, batch // plan.dp)
    env = {"B": local, "S": seq, "T": context - seq}
    rows = local * seq * (cfg.num_experts_per_tok or 1)
    env.update({n.attrs["rows"]: rows for n in graph.nodes
                if n.op == "dist.all_to_all" and isinstance(n.attrs["rows"], str) and n.attrs["rows"].isidentifier()})
    return env


def _nbytes(v, env) -> int:
    n = 1
    for d in v.type.shape:
        n *= eval_dim(d, env)
    return n * itemsize(v.type.dtype)


def _link_time(op: str, payload: float, world: int, gpu: GPU, nodes: int) -> tuple[float, float]:
    """(bytes each GPU moves, seconds) for one collective of `payload` bytes per rank over `world` ranks spanning
    `nodes` nodes (a TP group inside a node: 1)."""
    frac = (world - 1) / world
    moved = {"dist.all_reduce": 2 * frac * payload, "dist.all_gather": (world - 1) * payload,
             "dist.reduce_scatter": frac * payload, "dist.all_to_all": frac * payload}[op]
    if nodes == 1:
        return moved, moved / (gpu.nvlink_gbs * 1e9) + gpu.nvlink_latency_us * 1e-6
    if op == "dist.all_to_all":  # peers on other nodes: (world - per_node) of world - 1
        cross = moved * (world - world // nodes) / max(world - 1, 1)
        t = max(cross / (gpu.ib_gbs * 1e9), (moved - cross) / (gpu.nvlink_gbs * 1e9))
    else:  # a ring over nodes runs at its slowest link
        t = moved / (gpu.ib_gbs * 1e9)
    return moved, t + gpu.ib_latency_us * 1e-6


def step_cost(graph, plan: ParallelPlan, cfg, gpu: GPU, nodes: int, batch: int, seq: int, context: int,
              fp8: bool) -> StepCost:
    env = _env(graph, plan, cfg, batch, seq, context)
    payload: dict[str, int] = {}
    link = comm = 0.0
    for node in graph.nodes:
        if node.op.startswith("dist."):
            b = _nbytes(node.inputs[0], env)
            payload[node.op] = payload.get(node.op, 0) + b
            size = node.attrs["group_size"]  # a TP group is a block of consecutive GPUs: inside a node if it fits
            span = nodes if size == plan.world else max(1, size // gpu.gpus_per_node)
            moved, t = _link_time(node.op, b, size, gpu, span)
            link, comm = link + moved, comm + t
    tokens = batch * seq
    read, flops = _weight_traffic(graph, plan, cfg, tokens, env["B"] * seq)
    kv = sum(_nbytes(v, {**env, "T": context}) for v in graph.caches().values())
    peak = (gpu.fp8_tflops if fp8 else gpu.bf16_tflops) * 1e12
    return StepCost(tokens, payload, link, comm, (read + kv) / (gpu.hbm_gbs * 1e9), flops / peak)


def _weight_traffic(graph, plan: ParallelPlan, cfg, tokens: int, local_tokens: int) -> tuple[float, float]:
    """(weight bytes read, FLOPs) of one step on this rank: experts weighted by how likely the batch touches them."""
    expert_ids = set()
    read = flops = 0.0
    k, e = cfg.num_experts_per_tok or 1, cfg.n_routed_experts or 1
    for node in graph.nodes:
        if node.op != "moe.experts":
            continue
        ws = node.inputs[3:]
        expert_ids.update(id(v) for v in ws)
        per_expert = sum(_param_bytes(graph, v) for v in ws) / node.attrs["num_experts"]
        per_expert_numel = sum(_param_numel(graph, v) for v in ws) / node.attrs["num_experts"]
        touched = 1 - (1 - k / e) ** tokens
        read += per_expert * node.attrs["num_experts"] * touched
        copies = tokens * k * (node.attrs["num_experts"] / e if plan.ep > 1 else 1)
        flops += 2 * per_expert_numel * copies
    dense = [v for v in graph.params().values() if not _feeds(v, expert_ids)]
    read += sum(v.type.nbytes({}) for v in dense)
    flops += 2 * sum(v.type.numel({}) for v in dense if v.type.rank == 2) * local_tokens
    return read, flops


def _feeds(v, targets: set[int]) -> bool:
    """Whether param v reaches a value in `targets` through weight-only nodes (dequant, cast)."""
    if id(v) in targets:
        return True
    return any(_feeds(u.outputs[0], targets) for u in v.users if u.op in ("dequant_fp8", "cast"))


def _source_params(graph, v) -> list:
    if v.kind == "param":
        return [v]
    return [p for i in v.node.inputs for p in _source_params(graph, i)] if v.node is not None else []


def _param_bytes(graph, v) -> int:
    return sum(p.type.nbytes({}) for p in _source_params(graph, v))


def _param_numel(graph, v) -> int:
    return max((p.type.numel({}) for p in _source_params(graph, v)), default=0)


def plan_model(name: str, gpus: int, hw: GPU, nodes: int = 1, batch: int = 64, context: int = 4096,
               prefill: int = 4096, plans: list[ParallelPlan] | None = None, model=None) -> list[PlanRow]:
    """The cost of each candidate plan (or `plans`) of `name` on `gpus` GPUs `hw` over `nodes` nodes. Decode: one
    token for each of `batch` sequences at `context`; prefill: one `prefill`-token prompt per attention group."""
    if gpus % nodes or gpus // nodes > hw.gpus_per_node:
        raise ConfigError(f"{gpus} GPUs do not fit {nodes} node(s) of {hw.gpus_per_node} {hw.name} GPUs")
    model = model or models.build_model(name, weights=False, mtp=False, dtype="bfloat16")
    cfg, rows = model.config, []
    fp8 = bool(cfg.fp8_block_size)
    for plan in plans or candidate_plans(cfg, gpus, nodes):
        g = rank_graph(model, plan)
        weights = sum(v.type.nbytes({}) for v in g.params().values())
        kv = sum(_nbytes(v, _env(g, plan, cfg, batch, 0, context)) for v in g.caches().values())
        groups = plan.dp
        pre_env = _env(g, plan, cfg, groups, prefill, prefill)
        act = ACTIVATION_FACTOR * max(_nbytes(v, pre_env) for n in g.nodes for v in n.outputs)
        dec = step_cost(g, plan, cfg, hw, nodes, batch, 1, context, fp8)
        pre = step_cost(g, plan, cfg, hw, nodes, groups, prefill, prefill, fp8)
        total = (weights + kv + act) / 1e9
        rows.append(PlanRow(plan, weights / GiB, kv / GiB, act / GiB, dec, pre, total <= 0.95 * hw.memory_gb))
    return rows


def format_rows(name: str, rows: list[PlanRow], hw: GPU, gpus: int, nodes: int, batch: int, context: int) -> str:
    head = (f"{name} on {gpus}x {hw.name} ({nodes} node{'s' if nodes > 1 else ''}; {hw.memory_gb:g} GB, HBM "
            f"{hw.hbm_gbs:g} GB/s, NVLink {hw.nvlink_gbs:g} GB/s, IB {hw.ib_gbs:g} GB/s per GPU); decode batch "
            f"{batch} at context {context}")
    lines = [head, f"{'plan':<46} {'weights':>8} {'KV':>7} {'act':>6} {'fits':>5} {'comm/step':>10} "
                   f"{'comm ms':>8} {'mem ms':>7} {'decode tok/s':>12} {'prefill tok/s':>13}"]
    for r in rows:
        lines.append(f"{str(r.plan):<46} {r.weights_gib:7.1f}G {r.kv_gib:6.1f}G {r.activations_gib:5.1f}G "
                     f"{'yes' if r.fits else 'NO':>5} {r.decode.link_bytes / 2**20:8.2f}Mi "
                     f"{r.decode.comm_s * 1e3:8.3f} {r.decode.memory_s * 1e3:7.3f} {r.decode.tokens_per_s:12,.0f} "
                     f"{r.prefill.tokens_per_s:13,.0f}")
    return "\n".join(lines)
