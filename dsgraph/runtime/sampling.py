"""Sampling on the device: the next-token distribution after repetition penalty, temperature, top-k, top-p and
min-p (transformers' logits-processor semantics, applied in that order), and a draw from it by inverse CDF with
one uniform number per sequence.

The uniforms come from each sequence's own counter-based stream (splitmix64 over a key that a torch.Generator
seeded with (seed, sample index) draws once), computed on the host: a row's text depends only on its own seed,
never on what it is batched with or on which device runs it. Drawing them before a step is what lets the whole
sampling run inside the triton backend's CUDA-graph replay of the decode step (`StepSampler`): the step gets the
uniforms as a fixed buffer and hands back only the chosen ids.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from dsgraph.errors import InputError

MASK64 = (1 << 64) - 1


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

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


class RowStream:
    """One sequence's uniform numbers in (0, 1): splitmix64 of key + n * golden gamma for the n-th draw."""

    def __init__(self, key: int):
        self.key, self.count = key & MASK64, 0

    def uniform(self) -> float:
        self.count += 1
        z = (self.key + self.count * 0x9E3779B97F4A7C15) & MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return (((z ^ (z >> 31)) >> 11) + 0.5) * 2.0 ** -53


def generators(params: SamplingParams, samples: list[int], device=None) -> list[RowStream | None]:
    """One stream per row, keyed from (seed, the row's sample index among its prompt's n): the same seed gives the
    same draws whatever else is in the batch (None rows: greedy needs none)."""
    if params.greedy:
        return [None] * len(samples)
    out = []
    for j in samples:
        g = torch.Generator()
        if params.seed is None:
            g.seed()
        else:
            g.manual_seed((params.seed * 1_000_003 + j) % 2 ** 64)   # any int seed (manual_seed takes 64 bits)
        out.append(RowStream(int(torch.randint(0, 2 ** 62, (1,), generator=g))))
    return out


def uniforms(gens: list[RowStream], device, k: int | None = None) -> torch.Tensor:
    """Each row's next uniform [B] (or next k, [B, k]) as float64 on `device`."""
    vals = [g.uniform() for g in gens] if k is None else [[g.uniform() for _ in range(k)] for g in gens]
    return torch.tensor(vals, dtype=torch.float64, device=device)


def seen_mask(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """The tokens each row has seen [B, V] (bool) from their ids [B, N], for the repetition penalty."""
    return torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)


def penalize(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty over the tokens seen so far ([B, V] mask): positive scores divided, negative
    multiplied (once per distinct token, as transformers' gather/scatter does)."""
    if penalty == 1.0 or seen is None:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def distribution(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Probabilities [B, V] (fp32) of the next token under `params` (temperature > 0)."""
    x = penalize(logits.float(), seen, params.repetition_penalty) / params.temperature
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


def pick(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: row r takes the first token whose cumulative probability passes u[r] of the total
    (a zero-probability token has an empty interval and is never taken); ids [B, 1]."""
    cdf = probs.double().cumsum(-1)
    ids = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    return ids.clamp_(max=probs.shape[-1] - 1)


def draw(probs: torch.Tensor, gens: list[RowStream]) -> torch.Tensor:
    """One sample per row from probs [B, V], each row from its own stream; ids [B, 1]."""
    return pick(probs, uniforms(gens, probs.device))


def sample(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor | None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """The next ids [B, 1] from last-position logits [B, V] and each row's uniform u [B] (unused when greedy):
    device work only, no host synchronisation."""
    if params.greedy:
        return penalize(logits.float(), seen, params.repetition_penalty).argmax(-1, keepdim=True)
    return pick(distribution(logits, params, seen), u)


def next_tokens(logits: torch.Tensor, params: SamplingParams, gens, seen: torch.Tensor | None = None):
    """The next ids [B, 1] from last-position logits [B, V], drawing each row's uniform from its stream."""
    return sample(logits, params, None if params.greedy else uniforms(gens, logits.device), seen)


class StepSampler:
    """A decode step's sampling as fixed-shape device work over buffers it owns (each row's uniform, and its seen
    tokens when penalised), so a captured step replays it: the caller fills `u` (and `seen`) before the step and
    reads `next_ids` from its outputs. One per (batch, knobs), kept by the executable, so graphs are reused."""

    def __init__(self, params: SamplingParams, batch: int, vocab: int, device):
        self.params, self.batch = replace(params, seed=None), batch
        self.u = torch.full((batch,), 0.5, dtype=torch.float64, device=device)
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device) if params.penalized else None

    def load(self, gens: list[RowStream | None], rows: list[int]) -> None:
        """The next uniforms of the rows that sample after this step (the others keep a placeholder)."""
        if self.params.greedy:
            return
        vals = [0.5] * self.batch
        for k in rows:
            vals[k] = gens[k].uniform()
        self.u.copy_(torch.tensor(vals, dtype=torch.float64))

    def __call__(self, outputs: dict) -> dict:
        return {"next_ids": sample(outputs["logits"][:, -1], self.params, self.u, self.seen)}
