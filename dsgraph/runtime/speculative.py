"""MTP speculative decoding: the MTP branch drafts, the main model verifies.

Each step the MTP module drafts k tokens (k > 1 by chaining the module on its own
output hidden state), the main model scores [last token, drafts] in one multi-token
decode step, the longest prefix of drafts that agrees with the main model's greedy
choice is accepted plus the main model's next token, and both caches are cut back
past the rejected positions (a fixed-size state cache, V4's sliding window and compressor
rows, is rebuilt from the state before the step and the accepted rows, `cut_state`).
Every emitted token is a greedy choice of the main model given the tokens before it,
so the output equals plain greedy decoding.

Prompts of different lengths share a batch (their tails fed by plain steps first, see `speculate`).
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
from dsgraph.symbolic import eval_dim, parse_dim

from .checks import FiniteWatch
from .sampling import SamplingParams
from .spec_verify import GreedyVerifier, verifier
from .state import GenerateStats


def cut_state(before, after, length: int, dims: dict):
    """`after` (a step of S tokens from `before`) cut back to `length` tokens. `dims`: each cache's dim 1 (its
    type's). Caches that grow with T keep the rows of `length` tokens (T rows, or T//m compact compressed entries
    for V4; the rejected ones released for the next step to overwrite); a fixed-size state of R rows (V4's
    `cache.slide`, the last R rows of state + new) is rebuilt as the R rows ending at the last accepted one, from
    the state before the step and the step's newest rows (exact while S <= R)."""
    s, caches = after.length - before.length, {}
    for n, t in after.caches.items():
        r = dims.get(n, "T")
        if not isinstance(r, int):
            caches[n] = kv_cache.rewind(t[:, :eval_dim(parse_dim(r), {"T": length})])
        elif r:
            keep = length - before.length                                # accepted new rows
            caches[n] = torch.cat((before.caches[n], t[:, r - s:]), 1)[:, keep:keep + r]
        else:
            caches[n] = t
    return replace(after, caches=caches, length=length)


def cache_dims(graph) -> dict:
    """Dim 1 of each cache input: an int for a fixed-size state [B, R, ...], a dim in T for a growing cache."""
    return {n: v.type.shape[1] for n, v in graph.inputs.items() if v.kind == "cache"}


def fixed_states(graph) -> dict[str, int]:
    """The graph's fixed-size state caches [B, R, ...] (not [B, T, ...] or [B, T//m, ...]): name -> R."""
    return {n: int(v.type.shape[1]) for n, v in graph.inputs.items() if v.kind == "cache" and v.type.is_fixed_state}


class MTPDrafter:
    """Runs the split-off MTP branch over its own KV cache."""

    def __init__(self, exe, graph, compiled):
        self.exe, self.graph, self.compiled = exe, graph, compiled
        hidden = [n for n, v in graph.inputs.items() if v.kind == "activation" and n not in ("mtp_ids", "positions")]
        if len(hidden) != 1:
            raise InputError(f"the MTP branch {graph.name} must take one hidden state from the main model, takes "
                             f"{hidden}: compile it again with keep_mtp=True")
        self.hidden_input = hidden[0]

    def run(self, hidden, next_ids, state):
        """MTP positions state.length.. from main hidden states and the tokens after them."""
        b, s = next_ids.shape
        start = state.length
        positions = torch.arange(start, start + s, device=next_ids.device).expand(b, s)
        caches = {n: kv_cache.rewind(t) for n, t in state.caches.items()}
        out = self.compiled.run({"mtp_ids": next_ids, "positions": positions, self.hidden_input: hidden, **caches})
        new = {n: out[self.graph.cache_map[n]] for n in state.caches}
        return out, replace(state, caches=new, length=start + s)

    def draft(self, hidden, next_ids, state, depth: int, pick=GreedyVerifier().pick):
        """Feed the positions after `state` and chain `depth` drafts; returns (drafts [B, depth], their
        distributions [B, depth, V] or None for greedy drafts, the state after the fed positions: the chained
        positions read the MTP block's own output, so the next call starts before them)."""
        out, state = self.run(hidden, next_ids, state)
        picks, chained = [pick(out["mtp_logits"][:, -1])], state
        for _ in range(depth - 1):
            out, chained = self.run(out["mtp_hidden"][:, -1:], picks[-1][0], chained)
            picks.append(pick(out["mtp_logits"][:, -1]))
        qs = torch.stack([q for _, q in picks], dim=1) if picks[0][1] is not None else None
        return torch.cat([d for d, _ in picks], dim=1), qs, state


@torch.no_grad()
def generate_mtp(exe, prompt_ids, max_new_tokens: int, draft_depth: int = 1, return_stats: bool = False,
                 on_token=None, n: int = 1, seed: int | None = None, **knobs):
    """`knobs` (temperature, top_k, top_p, min_p) > greedy sample with rejection; `n` samples of each prompt row
    (rows j of a prompt seeded (seed, j)). `on_token(i, ids [B])` sees the i-th new token of every row."""
    params = SamplingParams(**knobs, seed=seed) if knobs else None
    ids = exe._ids(prompt_ids, "prompt_ids").repeat_interleave(n, dim=0)
    emit = None
    if on_token:
        made = [0]

        def emit(rows):   # equal prompt lengths: every row gets the same number of tokens a step
            for j in range(len(rows[0])):
                on_token(made[0] + j, torch.tensor([r[j] for r in rows], device=ids.device))
            made[0] += len(rows[0])
    tokens, _, stats = speculate(exe, ids, max_new_tokens, draft_depth, emit, params,
                                 [j for _ in range(ids.shape[0] // n) for j in range(n)])
    return (tokens, stats) if return_stats else tokens


def _prompt_rows(exe, prompt_ids) -> list[list[int]]:
    if isinstance(prompt_ids, (list, tuple)) and prompt_ids and all(isinstance(r, (list, tuple)) for r in prompt_ids):
        return [exe._ids(list(r), "prompt_ids")[0].tolist() for r in prompt_ids]
    return exe._ids(prompt_ids, "prompt_ids").tolist()


def speculate(exe, prompt_ids, max_new_tokens: int, draft_depth: int = 1, on_emit=None,
              params: SamplingParams | None = None, samples: list[int] | None = None, stop=None):
    """The speculative loop over prompts of any lengths (a tensor [B, P] or lists of ids); returns (new tokens
    [B, N], main KVState, GenerateStats), N = max_new_tokens unless `stop()` (asked before every main-model step)
    ended it early: then the count every row reached. `on_emit(rows)` gets each row's new tokens (host lists) as
    they are accepted, never past max_new_tokens.

    Ragged prompts: the batch prefills the shortest prompt's length, then plain one-token steps feed the longer
    prompts' tails while the rows already in pick their next token (decode_batch's way, generation.py); once every
    prompt is in, the MTP branch reads the main hidden states of every position so far and speculation starts.
    Every row's cache holds exactly its own tokens, so its greedy output is its output alone."""
    if exe.mtp is None:
        raise InputError("speculative='mtp' needs a model with an MTP module compiled with keep_mtp=True "
                         "(DeepSeek-V3/R1 checkpoints carry one; this model has none)")
    if draft_depth < 1:
        raise InputError(f"draft_depth must be >= 1, got {draft_depth}")
    prompts = _prompt_rows(exe, prompt_ids)
    bsz, fed, plen = len(prompts), min(map(len, prompts)), max(map(len, prompts))
    exe._check_length(plen + max_new_tokens + draft_depth)
    drafter = MTPDrafter(exe, *exe.mtp)
    dims = cache_dims(exe.graph)
    short = {n: r for n, r in fixed_states(exe.graph).items() if 0 < r < draft_depth + 1}
    if short:
        rows = min(short.values())
        raise InputError(f"draft_depth={draft_depth} verifies {draft_depth + 1} tokens a step, more than the "
                         f"fixed-size state caches {sorted(short)[:3]} keep rows ({rows}), so rejected drafts could "
                         f"not be rolled back: use draft_depth <= {rows - 1}")
    xfer = XFER + drafter.hidden_input
    policy = verifier(params, samples if samples is not None else list(range(bsz)), exe.device)
    made = [[] for _ in range(bsz)]

    def emitted(rows: list[list[int]]) -> None:
        rows = [r[:max_new_tokens - len(m)] for r, m in zip(rows, made)]
        for m, r in zip(made, rows):
            m.extend(r)
        if on_emit:
            on_emit(rows)

    watch = FiniteWatch(exe.dtype)
    t0 = time.perf_counter()
    ids = torch.tensor([p[:fed] for p in prompts], device=exe.device)
    out, state = exe.step(ids, exe.empty_state(bsz))
    hidden, steps = [out[xfer]], 1
    while fed < plen:                                   # feed the longer prompts' tails, one token a step
        watch.see(out["logits"][:, -1], steps - 1)
        ready = [k for k, p in enumerate(prompts) if len(p) <= fed]
        picked = iter(policy.first(out["logits"][ready, -1], ready)[:, 0].tolist() if ready else ())
        tok = [next(picked) if len(p) <= fed else p[fed] for p in prompts]
        emitted([[t] if len(p) <= fed else [] for t, p in zip(tok, prompts)])
        if stop and stop():
            return _result(made, state, plen, steps, time.perf_counter() - t0, t0, {"draft_depth": draft_depth},
                           exe.device)
        ids = torch.cat([ids, torch.tensor(tok, device=exe.device)[:, None]], dim=1)
        out, state = exe.step(ids[:, -1:], state)
        hidden.append(out[xfer])
        fed, steps = fed + 1, steps + 1
    watch.see(out["logits"][:, -1], steps - 1)
    tok = policy.first(out["logits"][:, -1])
    emitted(tok.tolist())
    mtp_state = exe.empty_state_for(drafter.graph, bsz)
    next_ids = torch.cat([ids[:, 1:], tok], dim=1)
    drafts, qs, mtp_state = drafter.draft(torch.cat(hidden, dim=1), next_ids, mtp_state, draft_depth, policy.pick)
    ttft = time.perf_counter() - t0

    accepted_at = torch.zeros(draft_depth)
    drafted_at = torch.zeros(draft_depth)
    row_agree = torch.zeros(bsz)
    spec_steps = 0
    t1 = time.perf_counter()
    while min(map(len, made)) < max_new_tokens and not (stop and stop()):
        start, before = state.length, state                    # position of `tok`
        out, state = exe.step(torch.cat([tok, drafts], dim=1), state)
        watch.see(out["logits"], steps)
        per_row, new, a = policy.verify(out["logits"], drafts, qs)   # accepted drafts per row, [B, a+1]
        row_agree += per_row
        drafted_at += bsz
        accepted_at += (torch.arange(draft_depth)[None] < per_row[:, None]).sum(0).float()
        state = cut_state(before, state, start + 1 + a, dims)
        emitted(new.tolist())
        steps, spec_steps = steps + 1, spec_steps + 1
        tok = new[:, -1:]
        # MTP positions start..start+a: main hidden there, followed by the accepted tokens and the bonus
        drafts, qs, mtp_state = drafter.draft(out[xfer][:, :a + 1], new, mtp_state, draft_depth, policy.pick)
    watch.check(steps)
    return _result(made, state, plen, steps, ttft, t1, {
        "draft_depth": draft_depth, "acceptance_per_position": (accepted_at / drafted_at.clamp(min=1)).tolist(),
        "row_acceptance": (row_agree / max(spec_steps, 1) / draft_depth).tolist()}, exe.device)


def _result(made: list[list[int]], state, plen: int, steps: int, ttft: float, t1: float, extra: dict, device):
    """(new tokens [B, N] for the N tokens every row reached, the main state, GenerateStats)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t1
    n = min(map(len, made))
    produced = sum(len(m) - 1 for m in made if m)
    rate = produced / dt if produced > 0 and dt > 0 else float("nan")
    return torch.tensor([m[:n] for m in made], dtype=torch.int64, device=device), state, GenerateStats(
        plen, n, steps, ttft, rate, extra={**extra, "mean_tokens_per_target_step": n / steps})
