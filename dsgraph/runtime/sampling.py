"""Sampling on the device: the next-token distribution after repetition penalty, temperature, top-k, top-p and
min-p (transformers' logits-processor semantics, applied in that order), and a draw from it with one
`torch.Generator` per sequence, so a row's text depends only on its own seed, never on what it is batched with.
Only the chosen ids leave the device.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from dsgraph.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy (argmax; the other knobs do not apply)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        checks = {"temperature": self.temperature >= 0, "top_k": self.top_k >= 0, "top_p": 0 < self.top_p <= 1,
                  "min_p": 0 <= self.min_p < 1, "repetition_penalty": self.repetition_penalty > 0}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"sampling {bad[0]}={getattr(self, bad[0])!r} is out of range: temperature >= 0, "
                             "top_k >= 0, 0 < top_p <= 1, 0 <= min_p < 1, repetition_penalty > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def generators(params: SamplingParams, samples: list[int], device) -> list[torch.Generator | None]:
    """One generator per row, seeded from (seed, the row's sample index among its prompt's n): the same seed
    gives the same text on the same backend and device, whatever else is in the batch."""
    if params.greedy:
        return [None] * len(samples)
    out = []
    for j in samples:
        g = torch.Generator(device=device)
        if params.seed is None:
            g.seed()
        else:
            g.manual_seed(params.seed * 1_000_003 + j)
        out.append(g)
    return out


def penalize(logits: torch.Tensor, history: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty over the tokens seen so far: positive scores divided, negative multiplied."""
    if penalty == 1.0 or history is None:
        return logits
    seen = torch.gather(logits, 1, history)
    return logits.scatter(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))


def distribution(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None) -> torch.Tensor:
    """Probabilities [B, V] (fp32) of the next token under `params` (temperature > 0)."""
    x = penalize(logits.float(), history, params.repetition_penalty) / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(sorted_x, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_x, -1) >= params.top_p     # mass before the token already reaches top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(x, -1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, gens: list[torch.Generator | None]) -> torch.Tensor:
    """One sample per row from probs [B, V], each row with its own generator; ids [B, 1]."""
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(gens)])[:, None]


def next_tokens(logits: torch.Tensor, params: SamplingParams, gens, history: torch.Tensor | None = None):
    """The next ids [B, 1] from last-position logits [B, V]."""
    if params.greedy:
        return penalize(logits.float(), history, params.repetition_penalty).argmax(-1, keepdim=True)
    return draw(distribution(logits, params, history), gens)
