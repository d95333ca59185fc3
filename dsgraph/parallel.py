"""`ParallelPlan`: how a model is split over the ranks of one process group (plain data, printable).

    ParallelPlan(tp=8)                       tensor parallel: heads, MLP and experts' intermediate dims, vocab
    ParallelPlan(tp=8, ep=8)                 TP attention and dense MLP; experts placed by rank (E/8 each),
                                             tokens replicated, one all-reduce after the MoE layer
    ParallelPlan(ep=8, dp_attention=True)    each rank runs attention (and dense layers) for its own requests;
                                             MoE tokens go to their experts' ranks with all_to_all and back
    ParallelPlan(tp=2, ep=8, dp_attention=True)   4 DP groups of 2 TP ranks: attention TP inside a group for
                                             the group's requests, MoE expert-parallel over all 8
    ParallelPlan(tp=2, ep=8)                 TP attention in groups of 2 (each group on every token: the
                                             groups repeat each other's attention), MoE over all 8

The world size is max(tp, ep); ep is 1 or the world, tp divides it. TP groups are contiguous blocks of tp ranks
(rank r is TP rank r % tp of group r // tp): tensor-parallel collectives run on the block, the MoE's on the world.
`check(config)` says which model dim a plan does not divide.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class ParallelPlan:
    tp: int = 1
    ep: int = 1
    dp_attention: bool = False

    def __post_init__(self):
        if self.tp < 1 or self.ep < 1:
            raise ConfigError(f"{self}: tp and ep must be >= 1")
        w = max(self.tp, self.ep)
        if w % self.tp or self.ep not in (1, w):
            raise ConfigError(f"{self}: ep must be 1 or the world size {w} and tp must divide it (TP groups of tp "
                              f"ranks inside expert parallelism); e.g. ParallelPlan(tp={self.tp}, ep={self.tp * 2})")
        if self.dp_attention and self.ep < 2:
            raise ConfigError(f"{self}: dp_attention runs attention per group of tp ranks for its own requests with "
                              f"expert-parallel MoE over all ranks: give ep >= 2, e.g. ParallelPlan(tp={self.tp}, "
                              f"ep={2 * w}, dp_attention=True)")

    @property
    def world(self) -> int:
        return max(self.tp, self.ep)

    @property
    def dp(self) -> int:
        """Attention data-parallel groups: the batch is cut into this many pieces (1 without dp_attention)."""
        return self.world // self.tp if self.dp_attention else 1

    def __str__(self) -> str:
        return f"ParallelPlan(tp={self.tp}, ep={self.ep}, dp_attention={self.dp_attention})"

    def to_dict(self) -> dict:
        return {"tp": self.tp, "ep": self.ep, "dp_attention": self.dp_attention}

    def check(self, config: dict, name: str = "the model") -> None:
        """Raise ConfigError naming the first dim of `config` (HF config.json keys) this plan does not divide."""
        if config.get("model_type") == "deepseek_v4" and self.world > 1:
            raise ConfigError(f"{self}: sharding DeepSeek-V4 graphs ({name}) is not supported yet (its attention, "
                              "hyper-connection and hash-routing ops have no shard rules); `dsgraph plan` sizes "
                              "V4 plans from the config")
        for key, size, by in self._divisions(config):
            if size % by:
                divisors = [d for d in range(1, size + 1) if size % d == 0][:12]
                raise ConfigError(f"{self} does not divide {key}={size} of {name} into {by} equal parts; "
                                  f"choose a size among its divisors {divisors}")

    def _divisions(self, c: dict):
        tp, ep = self.tp, self.ep
        if tp > 1:
            yield "num_attention_heads", c["num_attention_heads"], tp
            hkv = c.get("num_key_value_heads") or c["num_attention_heads"]
            if not c.get("kv_lora_rank") and hkv < tp:
                if tp % hkv:
                    raise ConfigError(f"{self}: num_key_value_heads={hkv} of the model must divide tp={tp} "
                                      "(each rank keeps one KV head, replicated across tp/Hkv ranks)")
            elif not c.get("kv_lora_rank"):
                yield "num_key_value_heads", hkv, tp
            yield "intermediate_size", c["intermediate_size"], tp
            yield "vocab_size", c["vocab_size"], tp
            if c.get("n_routed_experts"):
                yield "moe_intermediate_size", c["moe_intermediate_size"], tp
            if self.dp_attention and c.get("num_experts_per_tok", tp) < tp:  # each TP rank dispatches >= 1 slot
                raise ConfigError(f"{self}: num_experts_per_tok={c['num_experts_per_tok']} of the model is below tp: "
                                  "each TP rank of a DP group dispatches its share of a token's top-k slots")
        if ep > 1:
            if not c.get("n_routed_experts"):
                raise ConfigError(f"{self}: expert parallelism needs a MoE model (n_routed_experts), this one is "
                                  "dense; use tp")
            yield "n_routed_experts", c["n_routed_experts"], ep
