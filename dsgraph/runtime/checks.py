"""Checks of what callers hand the runtime (counts, token lists) and of what it produces (finite logits).

`FiniteWatch` catches silent garbage: a NaN or Inf weight makes every logit NaN, and greedy decoding then
returns token 0 forever. The first step is checked at once; later steps are folded into one device-side flag
read every `every` steps and at the end, so a decode loop on a GPU gains no per-step synchronisation.
"""
from __future__ import annotations

import torch

from dsgraph.errors import InputError, NumericsError


def check_count(value, what: str, least: int = 1) -> int:
    """`value` if it is an int (not a bool, float or string) >= `least`, else an InputError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} must be an integer >= {least}, got {value!r} ({type(value).__name__})")
    if value < least:
        raise InputError(f"{what} must be >= {least}, got {value}")
    return value


def ids_tensor(ids, what: str) -> torch.Tensor:
    """A list of token ids (or of lists of them, one per sequence) as an int64 tensor; anything else that is not
    a list of ints (strings, floats, ragged rows) is an InputError naming `what`."""
    rows = ids if ids and isinstance(ids[0], (list, tuple)) else [ids]
    for row in rows:
        if not isinstance(row, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            bad = next((t for t in (row if isinstance(row, (list, tuple)) else [row])
                        if not isinstance(t, int) or isinstance(t, bool)), row)
            raise InputError(f"{what} must be an integer tensor [B, S] or a list of ints; it holds {bad!r} "
                             f"({type(bad).__name__}): tokenize text first")
    big = next((t for row in rows for t in row if not -(1 << 62) < t < 1 << 62), None)
    if big is not None:
        raise InputError(f"{what} holds token id {big}, far outside any vocabulary; check the tokenizer")
    if len({len(r) for r in rows}) > 1:
        raise InputError(f"{what}: sequences of different lengths {[len(r) for r in rows]}; pad them or run them "
                         "one at a time")
    return torch.tensor(rows, dtype=torch.int64)


class FiniteWatch:
    """Raises NumericsError once logits seen by `see` held a NaN or Inf."""

    def __init__(self, dtype: str, every: int = 16):
        self.dtype, self.every = dtype, every
        self.ok: torch.Tensor | None = None

    def see(self, logits: torch.Tensor, step: int) -> None:
        finite = torch.isfinite(logits).all()
        self.ok = finite if self.ok is None else self.ok & finite
        if step == 0 or (step + 1) % self.every == 0:
            self.check(step)

    def check(self, step: int) -> None:
        if self.ok is not None and not bool(self.ok):
            raise NumericsError(
                f"the logits hold NaN or Inf (found by generation step {step}); a weight of the model is probably "
                f"NaN/Inf or overflows in {self.dtype}: run `dsgraph check-weights CHECKPOINT` to find the tensor "
                "(or compile in float32 to rule out overflow)")
