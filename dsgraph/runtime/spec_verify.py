"""How MTP speculation picks drafts and accepts them: greedy (a draft is kept when it is the main model's argmax,
so the output is plain greedy decoding's), or speculative rejection sampling at temperature > 0.

Rejection sampling (Leviathan et al., Chen et al. 2023): a draft d drawn from the MTP distribution q is kept with
probability min(1, p(d)/q(d)) under the main model's distribution p; at the first rejected position the token is
drawn from the residual max(0, p - q) renormalised; when every draft is kept a bonus token comes from p. Each
emitted token is then distributed exactly as plain sampling's. A batch shares one cache length, so a step keeps
the smallest number of accepted drafts a of its rows; a row that accepted further emits its accepted draft at
position a (itself an exact sample from p there, and the cut depends only on other rows' independent draws).
"""
from __future__ import annotations

import torch

from dsgraph.errors import InputError

from .sampling import SamplingParams, distribution, draw, generators, uniforms


class GreedyVerifier:
    def first(self, logits, rows=None):
        """The next token [B, 1] of plain decoding from last-position logits [B, V] (of the batch rows `rows`)."""
        return logits.argmax(-1, keepdim=True)

    def pick(self, logits):
        """A draft [B, 1] from MTP logits [B, V] and its distribution (None: greedy needs none)."""
        return logits.argmax(-1, keepdim=True), None

    def verify(self, logits, drafts, qs):
        """(per-row accepted counts on the host, emitted tokens [B, a + 1], a) from main logits [B, k+1, V]."""
        greedy = logits.argmax(-1)
        per_row = (greedy[:, :-1] == drafts).int().cumprod(dim=1).sum(1).cpu()   # one sync per step
        a = int(per_row.min())
        return per_row, torch.cat([drafts[:, :a], greedy[:, a:a + 1]], dim=1), a


class SampledVerifier:
    def __init__(self, params: SamplingParams, samples: list[int], device):
        if params.repetition_penalty != 1.0:
            raise InputError("speculative='mtp' sampling takes no repetition_penalty (the draft and target "
                             "distributions would need the emitted history per draft position)")
        self.params = params
        self.gens = generators(params, samples, device)

    def first(self, logits, rows=None):
        gens = self.gens if rows is None else [self.gens[k] for k in rows]
        return draw(distribution(logits, self.params), gens)

    def pick(self, logits):
        q = distribution(logits, self.params)
        return draw(q, self.gens), q

    def verify(self, logits, drafts, qs):
        b, k = drafts.shape
        p = distribution(logits.reshape(b * (k + 1), -1), self.params).view(b, k + 1, -1)
        pd = p[:, :k].gather(-1, drafts[..., None])[..., 0]
        qd = qs.gather(-1, drafts[..., None])[..., 0]
        u = uniforms(self.gens, p.device, k)
        per_row = (u * qd < pd).int().cumprod(dim=1).sum(1).cpu()               # one sync per step
        a = int(per_row.min())
        rows = torch.arange(b, device=p.device)
        if a < k:
            residual = (p[:, a] - qs[:, a]).clamp(min=0)
            empty = residual.sum(-1, keepdim=True) <= 0                          # p == q there: sample p
            residual = torch.where(empty, p[:, a], residual)
            fresh = draw(residual / residual.sum(-1, keepdim=True), self.gens)[:, 0]
            kept = (per_row > a).to(p.device)
            last = torch.where(kept, drafts[rows, a], fresh)
        else:
            last = draw(p[:, k], self.gens)[:, 0]
        return per_row, torch.cat([drafts[:, :a], last[:, None]], dim=1), a


def verifier(params: SamplingParams | None, samples: list[int], device):
    return GreedyVerifier() if params is None or params.greedy else SampledVerifier(params, samples, device)
