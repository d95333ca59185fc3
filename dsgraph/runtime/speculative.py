"""MTP speculative decoding: the MTP branch drafts, the main model verifies.

Each step the MTP module drafts k tokens (k > 1 by chaining the module on its own
output hidden state), the main model scores [last token, drafts] in one multi-token
decode step, the longest prefix of drafts that agrees with the main model's greedy
choice is accepted plus the main model's next token, and both caches are cut back
past the rejected positions. Every emitted token is a greedy choice of the main
model given the tokens before it, so the output equals plain greedy decoding.

A batch shares one cache length, so a step accepts the smallest agreeing prefix of
its rows (rows that agreed further re-verify those tokens next step: still exact,
a little less speedup); per-row agreement is reported in the statistics.
At temperature > 0 drafts are sampled and accepted by rejection sampling, so the output
is distributed as plain sampling's (dsgraph/runtime/spec_verify.py).
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from dsgraph.backends import kv_cache
from dsgraph.errors import InputError
from dsgraph.partition import XFER

from .checks import FiniteWatch
from .sampling import SamplingParams
from .spec_verify import GreedyVerifier, verifier
from .state import GenerateStats


def _cut(state, length: int):
    """The state cut back to `length` tokens; the rejected rows are released for the next step to overwrite."""
    return replace(state, caches={n: kv_cache.rewind(t[:, :length]) for n, t in state.caches.items()}, length=length)


class MTPDrafter:
    """Runs the split-off MTP branch over its own KV cache."""

    def __init__(self, exe, graph, compiled):
        self.exe, self.graph, self.compiled = exe, graph, compiled
        self.hidden_input = next(n for n, v in graph.inputs.items()
                                 if v.kind == "activation" and n not in ("mtp_ids", "positions"))

    def run(self, hidden, next_ids, state, start: int):
        """MTP positions start..start+S-1 from main hidden states and the tokens after them."""
        b, s = next_ids.shape
        positions = torch.arange(start, start + s, device=next_ids.device).expand(b, s)
        caches = {n: kv_cache.rewind(t[:, :start]) for n, t in state.caches.items()}
        out = self.compiled.run({"mtp_ids": next_ids, "positions": positions, self.hidden_input: hidden, **caches})
        new = {n: out[self.graph.cache_map[n]] for n in state.caches}
        return out, replace(state, caches=new, length=start + s)

    def draft(self, hidden, next_ids, state, start: int, depth: int, pick=GreedyVerifier().pick):
        """Feed positions start.. and chain `depth` drafts; returns (drafts [B, depth], their distributions
        [B, depth, V] or None for greedy drafts, state)."""
        out, state = self.run(hidden, next_ids, state, start)
        picks = [pick(out["mtp_logits"][:, -1])]
        for _ in range(depth - 1):
            out, state = self.run(out["mtp_hidden"][:, -1:], picks[-1][0], state, state.length)
            picks.append(pick(out["mtp_logits"][:, -1]))
        qs = torch.stack([q for _, q in picks], dim=1) if picks[0][1] is not None else None
        return torch.cat([d for d, _ in picks], dim=1), qs, state


@torch.no_grad()
def generate_mtp(exe, prompt_ids, max_new_tokens: int, draft_depth: int = 1, return_stats: bool = False,
                 on_token=None, n: int = 1, seed: int | None = None, **knobs):
    """`knobs` (temperature, top_k, top_p, min_p) > greedy sample with rejection; `n` samples of each prompt row
    (rows j of a prompt seeded (seed, j))."""
    params = SamplingParams(**knobs, seed=seed) if knobs else None
    ids = exe._ids(prompt_ids, "prompt_ids").repeat_interleave(n, dim=0)
    tokens, _, stats = speculate(exe, ids, max_new_tokens, draft_depth, on_token, params,
                                 [j for _ in range(ids.shape[0] // n) for j in range(n)])
    return (tokens, stats) if return_stats else tokens


def speculate(exe, prompt_ids, max_new_tokens: int, draft_depth: int = 1, on_token=None,
              params: SamplingParams | None = None, samples: list[int] | None = None):
    """The speculative loop; returns (new tokens [B, N], main KVState, GenerateStats)."""
    if exe.mtp is None:
        raise InputError("speculative='mtp' needs a model with an MTP module compiled with keep_mtp=True "
                         "(DeepSeek-V3/R1 checkpoints carry one; this model has none)")
    if draft_depth < 1:
        raise InputError(f"draft_depth must be >= 1, got {draft_depth}")
    ids = exe._ids(prompt_ids, "prompt_ids")
    bsz, plen = ids.shape
    exe._check_length(plen + max_new_tokens + draft_depth)
    drafter = MTPDrafter(exe, *exe.mtp)
    xfer = XFER + drafter.hidden_input
    policy = verifier(params, samples if samples is not None else list(range(bsz)), exe.device)

    watch = FiniteWatch(exe.dtype)
    t0 = time.perf_counter()
    out, state = exe.step(ids, exe.empty_state(bsz))
    watch.see(out["logits"][:, -1], 0)
    tok = policy.first(out["logits"][:, -1])
    new = [tok]
    if on_token:
        on_token(0, tok[:, 0])
    mtp_state = exe.empty_state_for(drafter.graph, bsz)
    next_ids = torch.cat([ids[:, 1:], tok], dim=1)
    drafts, qs, mtp_state = drafter.draft(out[xfer], next_ids, mtp_state, 0, draft_depth, policy.pick)
    ttft = time.perf_counter() - t0

    accepted_at = torch.zeros(draft_depth)
    drafted_at = torch.zeros(draft_depth)
    row_agree = torch.zeros(bsz)
    steps = 1
    t1 = time.perf_counter()
    while sum(t.shape[1] for t in new) < max_new_tokens:
        start = state.length                                   # position of `tok`
        out, state = exe.step(torch.cat([tok, drafts], dim=1), state)
        watch.see(out["logits"], steps)
        per_row, emitted, a = policy.verify(out["logits"], drafts, qs)   # accepted drafts per row, [B, a+1]
        row_agree += per_row
        drafted_at += bsz
        accepted_at += (torch.arange(draft_depth)[None] < per_row[:, None]).sum(0).float()
        state = _cut(state, start + 1 + a)
        if on_token:
            done = sum(t.shape[1] for t in new)
            for j in range(min(emitted.shape[1], max_new_tokens - done)):
                on_token(done + j, emitted[:, j])
        new.append(emitted)
        steps += 1
        tok = emitted[:, -1:]
        # MTP positions start..start+a: main hidden there, followed by the accepted tokens and the bonus
        hidden = out[xfer][:, :a + 1]
        drafts, qs, mtp_state = drafter.draft(hidden, emitted, mtp_state, start, draft_depth, policy.pick)
    watch.check(steps)
    if exe.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t1
    result = torch.cat(new, dim=1)[:, :max_new_tokens]
    produced = max_new_tokens - 1
    rate = produced * bsz / dt if produced > 0 and dt > 0 else float("nan")
    return result, state, GenerateStats(
        plen, max_new_tokens, steps, ttft, rate,
        extra={"draft_depth": draft_depth,
               "acceptance_per_position": (accepted_at / drafted_at.clamp(min=1)).tolist(),
               "mean_tokens_per_target_step": max_new_tokens / steps,
               "row_acceptance": (row_agree / max(steps - 1, 1) / draft_depth).tolist()})
