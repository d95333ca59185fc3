"""Text in, text out: `exe.generate("text" | ["a", "b"] | chat messages | ids, ...)` with sampling, stop rules
and streaming.

A prompt is a string (encoded with the checkpoint's tokenizer, its bos included), a list of strings, a chat
(a list of {"role", "content"} dicts, rendered with the checkpoint's template and the assistant's generation
prompt) or token ids. Text prompts return GenerationOutput(s); id prompts return ids, as greedy `generate`
always has (a tensor [B, N] where every row ran to max_new_tokens, else a list of id lists).

Stop rules, checked after every token: an EOS id (generation_config.json's, possibly several; finish_reason
"eos"), a stop string in the detokenised text, across token boundaries ("stop"), max_new_tokens or max_time
("length").

Prompts of different lengths share one batch without padding or masks: the batch prefills the shortest prompt's
length, then each step feeds every row one token, a longer prompt's next token until its prompt is in, then its
own samples. Every row's cache holds exactly its own tokens (one cache length for the batch, as the graphs
take), so each row's output is what it would be alone. Prompts more than RAGGED_SPAN tokens apart go in separate
batches (their tails would take a step a token). MTP speculation feeds ragged tails the same way before it starts
drafting (speculative.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dsgraph.errors import InputError, TokenizerError
from dsgraph.text import TextStream

from .sampling import SamplingParams, generators, seen_mask
from .speculative import speculate
from .state import KVState

KNOBS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
RAGGED_SPAN = 64


@dataclass
class GenerationOutput:
    """One finished sequence."""

    text: str | None
    token_ids: list[int]
    finish_reason: str                 # "eos" | "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    stop: str | int | None = None      # the stop string or EOS id that ended it
    extra: dict = field(default_factory=dict)


@dataclass
class Request:
    """What every row of one generate call shares."""

    params: SamplingParams
    max_new_tokens: int
    eos: frozenset = frozenset()
    stop: tuple = ()
    max_time: float | None = None
    tokenizer: object = None
    skip_special_tokens: bool = True
    on_text: Callable[[int, str], None] | None = None
    speculative: str | None = None
    draft_depth: int = 1


def sampling_params(exe, seed=None, text: bool = True, **knobs) -> SamplingParams:
    """The caller's knobs over the checkpoint's generation_config.json defaults for text prompts (greedy where it
    has none or says do_sample=false; id prompts default to greedy, as `generate` always has)."""
    unknown = set(knobs) - set(KNOBS)
    if unknown:
        raise InputError(f"unknown generate option(s) {sorted(unknown)}; sampling takes {', '.join(KNOBS)}, seed")
    gc = getattr(exe.tokenizer, "generation", None) if text else None
    defaults = {k: getattr(gc, k) for k in KNOBS} if gc is not None else {}
    if gc is None or not gc.do_sample:
        defaults["temperature"] = 0.0
    return SamplingParams(**{**defaults, **{k: v for k, v in knobs.items() if v is not None}}, seed=seed)


def wants_generation(prompt, options: dict) -> bool:
    """Whether a generate call needs this module: text, ragged id lists or any sampling/stop option."""
    ragged = isinstance(prompt, (list, tuple)) and len({len(r) for r in prompt if isinstance(r, (list, tuple))}) > 1
    return bool(options) or ragged or is_text(prompt)


def is_text(prompt) -> bool:
    return isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and bool(prompt)
                                       and all(isinstance(p, (str, dict)) for p in prompt))


def _id_rows(exe, prompt) -> list[list[int]]:
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(r, (list, tuple)) for r in prompt):
        return [exe._ids(list(r), "prompt_ids")[0].tolist() for r in prompt]   # ragged lists of ids
    return exe._ids(prompt, "prompt_ids").tolist()


def text_rows(exe, prompt) -> tuple[list[list[int]], bool]:
    """(token id rows, whether one output was asked for) of a text prompt (Executable.text_rows; multimodal
    executables expand image placeholders there)."""
    tok = exe.tokenizer
    if tok is None:
        raise TokenizerError(f"{exe.model.name} has no tokenizer (no tokenizer.json in its checkpoint or artifact);"
                             " give token ids, or load a checkpoint directory that ships its tokenizer")
    if isinstance(prompt, str):
        return [tok.encode(prompt)], True
    if all(isinstance(p, dict) for p in prompt):      # one chat
        return [tok.apply_chat_template(list(prompt), add_generation_prompt=True)], True
    if not all(isinstance(p, str) for p in prompt):
        raise InputError("a list prompt is all strings (a batch) or all {'role', 'content'} dicts (a chat)")
    return [tok.encode(p) for p in prompt], False


def generate(exe, prompt, max_new_tokens: int = 32, *, n: int = 1, seed: int | None = None, stop=(),
             stop_token_ids=None, max_time: float | None = None, skip_special_tokens: bool = True,
             on_text: Callable[[int, str], None] | None = None, speculative: str | None = None,
             draft_depth: int = 1, **knobs):
    """See the module docstring; `n` samples per prompt (rows j of a prompt are seeded (seed, j));
    speculative="mtp" drafts with the MTP branch (dsgraph/runtime/speculative.py), stop rules applied to what it
    emits."""
    text = is_text(prompt)
    rows, single = exe.text_rows(prompt) if text else (_id_rows(exe, prompt), False)
    if text:   # the tokenizer's ids checked against the model's vocabulary, an empty encoding refused
        rows = [exe._ids(r, "the encoded prompt")[0].tolist() for r in rows]
    if max_new_tokens < 1 or n < 1:
        raise InputError(f"max_new_tokens and n must be >= 1, got {max_new_tokens} and {n}")
    if stop and not text:
        raise InputError("stop strings need a text prompt (they are matched on the decoded text)")
    eos = exe.tokenizer.eos_token_ids if text and stop_token_ids is None else list(stop_token_ids or ())
    req = Request(sampling_params(exe, seed, text, **knobs), max_new_tokens, frozenset(eos),
                  (stop,) if isinstance(stop, str) else tuple(stop), max_time,
                  exe.tokenizer if text else None, skip_special_tokens, on_text, speculative, draft_depth)
    expanded = [(i, j) for i in range(len(rows)) for j in range(n)]
    outs = run_rows(exe, [rows[i] for i, _ in expanded], [j for _, j in expanded], req)
    if text:
        return outs[0] if single and n == 1 else outs
    ids = [o.token_ids for o in outs]
    if all(len(r) == max_new_tokens for r in ids):
        return torch.tensor(ids, dtype=torch.int64, device=exe.device)
    return ids


def run_rows(exe, rows: list[list[int]], samples: list[int], req: Request) -> list[GenerationOutput]:
    """Every row generated, rows of nearby prompt lengths batched together; outputs in the order of `rows`."""
    for r in rows:
        exe._check_length(len(r) + req.max_new_tokens - 1)
    outs: list[GenerationOutput | None] = [None] * len(rows)
    groups: list[list[int]] = []
    for i in sorted(range(len(rows)), key=lambda i: len(rows[i])):
        if not groups or len(rows[i]) - len(rows[groups[-1][0]]) > RAGGED_SPAN:
            groups.append([])
        groups[-1].append(i)
    run = decode_batch if req.speculative is None else speculative_batch
    for idx in groups:
        group = run(exe, [rows[i] for i in idx], [samples[i] for i in idx], idx, req)
        for i, o in zip(idx, group):
            outs[i] = o
    return outs


class _Row:
    """One sequence's progress: its tokens, its text stream and why it finished."""

    def __init__(self, index: int, prompt: list[int], req: Request):
        self.index, self.prompt, self.req = index, prompt, req
        self.tokens: list[int] = []
        self.stream = TextStream(req.tokenizer, req.stop, req.skip_special_tokens, prompt) \
            if req.tokenizer is not None else None
        self.finish: str | None = None
        self.stop = None
        self.ttft = float("nan")

    def push(self, tok: int) -> None:
        self.tokens.append(tok)
        if self.stream is not None:       # an EOS is text too, unless special (transformers' decode keeps it)
            self._show(self.stream.push(tok))
            if self.stream.stopped_on is not None:
                self.finish, self.stop = "stop", self.stream.stopped_on
        if self.finish is None and tok in self.req.eos:
            self.end("eos")
            self.stop = tok
        if self.finish is None and len(self.tokens) >= self.req.max_new_tokens:
            self.end("length")

    def end(self, reason: str) -> None:
        self.finish = reason
        if self.stream is not None:
            self._show(self.stream.finish())

    def _show(self, piece: str) -> None:
        if piece and self.req.on_text is not None:
            self.req.on_text(self.index, piece)


def _rows(t: torch.Tensor, keep: list[int]) -> torch.Tensor:
    return t[torch.tensor(keep, device=t.device)]


def _state_rows(state: KVState, keep: list[int]) -> KVState:
    return KVState({n: _rows(c, keep) for n, c in state.caches.items()}, state.length, len(keep))


def _feed(active, fed: int, sampled: torch.Tensor, device):
    """The next input token of every row: its sample where its prompt is in, else its prompt's next token;
    (tokens [B, 1] on the device, the same on the host, the rows that sampled). The one host transfer a step:
    the chosen ids."""
    ready = [k for k, r in enumerate(active) if len(r.prompt) <= fed]
    host = sampled[:, 0].tolist()
    if len(ready) == len(active):
        return sampled, host, ready
    chosen = [host[k] if len(r.prompt) <= fed else r.prompt[fed] for k, r in enumerate(active)]
    return torch.tensor(chosen, device=device)[:, None], chosen, ready


def _sampler(exe, params, active, fed: int, gens, seen):
    """The executable's StepSampler for this batch, loaded for the rows that sample after the next step (their
    uniforms; the seen tokens when penalised)."""
    sampler = exe.step_sampler(params, len(active))
    sampler.load(gens, [k for k, r in enumerate(active) if len(r.prompt) <= fed])
    if seen is not None:
        sampler.seen.copy_(seen)
    return sampler


@torch.no_grad()
def decode_batch(exe, prompts: list[list[int]], samples: list[int], index: list[int], req: Request):
    """Prefill the shortest prompt's length, then decode (feeding longer prompts' tails) until every row has
    stopped. Each step samples on the device, inside the decode step's CUDA graph where the backend has one."""
    params = req.params
    gens = generators(params, samples, exe.device)
    rows = [_Row(i, p, req) for i, p in zip(index, prompts)]
    fed = min(len(p) for p in prompts)
    ids = torch.tensor([p[:fed] for p in prompts], device=exe.device)
    active = list(rows)                               # the rows still in the batch, in batch order
    seen = seen_mask(ids, exe.vocab_size) if params.penalized else None   # the tokens seen, for the penalty
    t0 = time.perf_counter()
    sampler = _sampler(exe, params, active, fed, gens, seen)
    out, state = exe.step(ids, exe.empty_state(len(active)), epilogue=sampler)
    t1 = None
    while True:
        tok, chosen, ready = _feed(active, fed, out["next_ids"], exe.device)
        now = time.perf_counter()
        t1 = t1 or now
        for k in ready:
            if not active[k].tokens:
                active[k].ttft = now - t0
            active[k].push(chosen[k])
        keep = [k for k, r in enumerate(active) if r.finish is None]
        if not keep:
            break
        if req.max_time is not None and time.perf_counter() - t0 > req.max_time:
            for k in keep:
                active[k].end("length")
            break
        if len(keep) < len(active):                   # finished rows leave the batch: no more work for them
            active, gens = [active[k] for k in keep], [gens[k] for k in keep]
            seen = None if seen is None else _rows(seen, keep)
            tok, state = _rows(tok, keep), _state_rows(state, keep)
        fed += 1
        if seen is not None:
            seen.scatter_(1, tok, True)
        sampler = _sampler(exe, params, active, fed, gens, seen)
        out, state = exe.step(tok, state, epilogue=sampler)
    dt = time.perf_counter() - t1
    made = sum(len(r.tokens) - 1 for r in rows)
    return _outputs(rows, made / dt if made and dt > 0 else float("nan"))


def _outputs(rows: list[_Row], rate: float, extra: dict | None = None) -> list[GenerationOutput]:
    return [GenerationOutput(r.stream.text if r.stream is not None else None, r.tokens, r.finish, len(r.prompt),
                             len(r.tokens), r.ttft, rate, r.stop, dict(extra or {})) for r in rows]


def speculative_batch(exe, prompts: list[list[int]], samples: list[int], index: list[int], req: Request):
    """One batch of prompts through MTP speculation (greedy or rejection sampling); the stop rules see each
    emitted token, and the loop ends once every row has stopped or max_time has passed."""
    if req.speculative != "mtp":
        raise InputError(f"speculative={req.speculative!r}: the only speculative mode is 'mtp'")
    rows = [_Row(i, p, req) for i, p in zip(index, prompts)]
    t0 = time.perf_counter()

    def on_emit(tokens: list[list[int]]) -> None:
        now = time.perf_counter()
        for row, toks in zip(rows, tokens):
            for t in toks:
                if row.finish is None:
                    if not row.tokens:
                        row.ttft = now - t0
                    row.push(t)

    def stop() -> bool:
        return all(r.finish is not None for r in rows) or \
            (req.max_time is not None and time.perf_counter() - t0 > req.max_time)

    params = None if req.params.greedy else req.params
    _, _, stats = speculate(exe, prompts, req.max_new_tokens, req.draft_depth, on_emit, params, samples, stop)
    for r in rows:
        if r.finish is None:      # stopped by max_time
            r.end("length")
    return _outputs(rows, stats.decode_tokens_per_s, stats.extra)
