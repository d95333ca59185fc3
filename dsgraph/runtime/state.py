"""The values generation threads from step to step: the caches after some tokens, and what a run measured."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVState:
    """Caches after `length` tokens, for a batch of `batch` sequences."""

    caches: dict[str, torch.Tensor]
    length: int
    batch: int


@dataclass
class GenerateStats:
    prompt_tokens: int
    new_tokens: int
    target_steps: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    extra: dict = field(default_factory=dict)
