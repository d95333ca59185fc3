"""`ParallelPlan`: how a model is split over the ranks of one process group (plain data, printable).

    ParallelPlan(tp=8)                       tensor parallel: heads, MLP and experts' intermediate dims, vocab
    ParallelPlan(tp=8, ep=8)                 TP attention and dense MLP; experts placed by rank (E/8 each),
                                             tokens replicated, one all-reduce after the MoE layer
    ParallelPlan(ep=8, dp_attention=True)    each rank runs attention (and dense layers) for its own requests;
                                             MoE tokens go to their experts' ranks with all_to_all and back

The world size is max(tp, ep); tp and ep are each 1 or the world (subgroups, e.g. tp=2 inside ep=8, are later
work and refused with a message). `check(config)` says which model dim a plan does not divide.
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
        if self.tp not in (1, w) or self.ep not in (1, w):
            raise ConfigError(f"{self}: tp and ep must each be 1 or the world size {w} (TP or EP subgroups are "
                              "not supported yet); use tp=ep, or one of them alone")
        if self.dp_attention and (self.tp != 1 or self.ep < 2):
            raise ConfigError(f"{self}: dp_attention runs attention replicated per rank with expert-parallel MoE; "
                              f"use ParallelPlan(ep={w}, dp_attention=True) (tp=1)")

    @property
    def world(self) -> int:
        return max(self.tp, self.ep)

    def __str__(self) -> str:
        return f"ParallelPlan(tp={self.tp}, ep={self.ep}, dp_attention={self.dp_attention})"

    def to_dict(self) -> dict:
        return {"tp": self.tp, "ep": self.ep, "dp_attention": self.dp_attention}

    def check(self, config: dict, name: str = "the model") -> None:
        """Raise ConfigError naming the first dim of `config` (HF config.json keys) this plan does not divide."""
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
        if ep > 1:
            if not c.get("n_routed_experts"):
                raise ConfigError(f"{self}: expert parallelism needs a MoE model (n_routed_experts), this one is "
                                  "dense; use tp")
            yield "n_routed_experts", c["n_routed_experts"], ep
