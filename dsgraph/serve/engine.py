"""Continuous batching: `Engine(exe)` with `add_request` / `step` / `abort`, usable without HTTP.

Iteration-level scheduling: each `step` runs every running request one chunk (a decode token, or a prefill
chunk within the per-step token budget `max_num_batched_tokens`), admits waiting requests while there are
seats (`max_num_seqs`), budget and free blocks, and lets finished requests leave at once. The KV cache is paged
(dsgraph/serve/paged.py); when blocks run out the newest running request is preempted by recompute: its blocks
are freed, it waits again, and on resume its prompt and the tokens it had made are prefilled again (nothing is
re-sampled, so its output is unchanged). Prompts starting with cached full blocks skip their prefill.

Where the backend has a paged program (`exe.compiled.paged_decode`: triton, backends/triton/paged_decode.py) a
step makes at most two calls over the pools, whatever its number of requests: every one-token row in one decode
call (under CUDA graphs per batch bucket on a GPU), and every prefill chunk packed into rows of one bucketed
length in one prefill call (packing.py); the attention reads each request's blocks through its block table and
`cache.append` writes each new row into its block. Everything else (every step on eager and tvm, whose graphs take
one cache length per batch, and the prefill chunks of models with fixed-size states) runs one graph call per
(cache length, chunk length) group, over the group's caches gathered from the pool: correct on every backend,
slower. `decode_path` says which runs. Fixed-size state caches (V4's sliding window and compressor rows) live in
one slot per running request (`StateSlots`, taken zeroed on admission): a graph call gathers its group's slots and
writes the next states back; the paged decode program reads and writes them in place at each row's slot. Compact
caches (V4's compressed entries [B, T//m, D]) are kept per request (`CompactEntries`) and run on the contiguous
path, whose calls hold one cache length (the paged program declines them: see its reason in `decode_path`).
Sampling and stop rules are the text runtime's, per request.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from dsgraph.errors import DSGraphError, InputError, TokenizerError
from dsgraph.runtime import generation
from dsgraph.runtime.sampling import SamplingParams, generators, next_tokens, seen_mask
from dsgraph.runtime.state import KVState

from .packing import Chunk, pack
from .paged import BlockPool, BlockTables, CompactEntries, StateSlots

DEFAULT_MAX_TOKENS = 256
MAX_LOGPROBS = 20
DEFAULT_SEQ_TOKENS = 4096    # the default pool holds max_num_seqs sequences of this many tokens (or the model's limit)


@dataclass(frozen=True)
class NewRequest:
    """One add_request call checked and reduced to data: the prompt as token ids, its sampling parameters and
    stop rules. Under `dsgraph serve --tp/--ep` rank 0 sends these to the other ranks' engines (lockstep.py)."""

    ids: list[int]
    params: SamplingParams
    max_tokens: int
    eos: tuple[int, ...]
    stop: tuple[str, ...]
    detokenize: bool             # stream text and apply stop strings (with the tokenizer)
    skip_special_tokens: bool
    logprobs: int | None
    request_id: str | None
    sample: int                  # the sample index among its prompt's n (seeds (seed, sample))


@dataclass
class RequestOutput:
    """What one step made for one request: its new tokens and text, and, once finished, why."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None     # "eos" | "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, dict[int, float]]] | None = None   # per new token: its logprob, the top-k's


class _Seq:
    """One request in the engine: its row (tokens, stop rules, text), its block table and progress."""

    def __init__(self, rid: str, prompt: list[int], req: generation.Request, sample: int, device, arrival: int):
        self.rid, self.prompt, self.req, self.arrival = rid, prompt, req, arrival
        self.text: list[str] = []
        self.tokens = list(prompt)   # the prompt and every token made, kept as one list (read every step)
        self.hashes: list[int] = []  # the content hashes of the table's full blocks registered so far
        self.row = generation._Row(0, prompt, req)
        self.gen = generators(req.params, [sample], device)[0]
        self.knobs = replace(req.params, seed=None)    # requests with equal knobs share a sampler call
        self.table: list[int] = []
        self.slot: int | None = None   # its fixed-size state caches' slot while it runs (V4's, StateSlots)
        self.computed = 0            # tokens whose cache rows are in the table's blocks
        self.sent = 0                # tokens already reported by step()
        self.top_logprobs: int | None = None     # asked for logprobs: how many alternatives per token
        self.logprobs: list = []
        self.t0 = time.perf_counter()

    def pending(self) -> int:
        return len(self.tokens) - self.computed


class Engine:
    """A continuous-batching engine over an Executable (any backend)."""

    def __init__(self, exe, max_num_seqs: int = 16, max_num_batched_tokens: int = 512, block_size: int = 16,
                 num_blocks: int | None = None, prefix_caching: bool = True, paged_decode: bool = True):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise InputError(f"max_num_seqs and max_num_batched_tokens must be >= 1, got {max_num_seqs}, "
                             f"{max_num_batched_tokens}")
        self.exe, self.max_num_seqs, self.budget = exe, max_num_seqs, max_num_batched_tokens
        limit = min(exe.max_positions or DEFAULT_SEQ_TOKENS, DEFAULT_SEQ_TOKENS)
        self.pool = BlockPool(exe.graph, num_blocks or max_num_seqs * -(-limit // block_size), block_size,
                              exe.device)
        # a prefix hit would skip the tokens that a fixed-size state or compact entries (V4) summarise: such
        # models prefill all
        self.prefix_caching = prefix_caching and not (self.pool.states or self.pool.compact)
        self.slots = StateSlots(self.pool.states, max_num_seqs, exe.device) if self.pool.states else None
        self.compact = CompactEntries(self.pool.compact, exe.device) if self.pool.compact else None
        self.waiting: list[_Seq] = []
        self.running: list[_Seq] = []
        self.preemptions = 0
        self.calls = {"paged_decode": 0, "paged_prefill": 0, "contiguous": 0}     # graph calls by path
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self.paged, self.decode_path = self._paged_runner(paged_decode)
        self.tables = BlockTables(max_num_seqs) if self.paged is not None else None

    def _paged_runner(self, wanted: bool):
        """The backend's paged decode runner, prepared, and the line saying which decode path runs (and why)."""
        contiguous = "contiguous: one call per (cache length, chunk) group over caches gathered from the pool"
        runner = getattr(self.exe.compiled, "paged_decode", None)
        if not wanted:
            return None, f"{contiguous} (paged_decode=False)"
        if runner is None:
            return None, f"{contiguous} (the {self.exe.compiled.report.backend} backend has no paged decode " \
                         "program for this model; see its compile report)"
        try:
            runner.prepare()
        except DSGraphError as e:
            return None, f"{contiguous} (the paged decode program could not be built: {e})"
        return runner, runner.describe()

    # requests -------------------------------------------------------------------------------
    def add_request(self, prompt, max_tokens: int | None = 16, *, request_id: str | None = None, sample: int = 0,
                    seed: int | None = None, stop=(), stop_token_ids=None, skip_special_tokens: bool = True,
                    detokenize: bool | None = None, logprobs: int | None = None, **knobs) -> str:
        """Queue one request (text, a chat, or token ids, as `generate` takes one prompt); returns its id.
        max_tokens None runs to the model's limit (at most DEFAULT_MAX_TOKENS); `detokenize` (default: for text
        prompts) streams text and applies stop strings and the tokenizer's EOS to an id prompt too, as a server
        wants. logprobs=k reports each new token's log-probability under the model (before sampling's knobs) and
        the k most likely tokens'."""
        return self.enqueue(self.new_request(prompt, max_tokens, request_id=request_id, sample=sample, seed=seed,
                                             stop=stop, stop_token_ids=stop_token_ids, detokenize=detokenize,
                                             skip_special_tokens=skip_special_tokens, logprobs=logprobs, **knobs))

    def new_request(self, prompt, max_tokens: int | None = 16, *, request_id: str | None = None, sample: int = 0,
                    seed: int | None = None, stop=(), stop_token_ids=None, skip_special_tokens: bool = True,
                    detokenize: bool | None = None, logprobs: int | None = None, **knobs) -> NewRequest:
        """add_request's arguments checked and reduced to a NewRequest (nothing is queued)."""
        exe, text = self.exe, isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], dict))
        rows = exe.text_rows(prompt)[0] if text else [list(prompt)]
        # checked on the host: a request arriving from another thread must not touch the device (the engine's
        # thread may be capturing a CUDA graph)
        ids = exe._ids(rows[0], "the encoded prompt" if text else "prompt_ids", device="cpu")[0].tolist()
        if max_tokens is None:
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, (exe.max_positions or 1 << 30) - len(ids)))
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InputError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        exe._check_length(len(ids) + max_tokens)
        if self.pool.blocks_for(len(ids) + max_tokens) > self.pool.num_blocks:
            raise InputError(f"a request of {len(ids)} prompt tokens + max_tokens={max_tokens} needs more than the "
                             f"{self.pool.num_blocks} blocks of {self.pool.block_size} tokens of the KV cache; "
                             "lower max_tokens or give the engine more blocks (num_blocks, dsgraph serve --num-blocks)")
        if detokenize and exe.tokenizer is None:
            raise TokenizerError(f"{exe.model.name} has no tokenizer: its output cannot be detokenised")
        detokenize = text if detokenize is None else detokenize
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_LOGPROBS):
            raise InputError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {logprobs!r}")
        if stop and not detokenize:
            raise InputError("stop strings need a text prompt (they are matched on the decoded text)")
        eos = exe.tokenizer.eos_token_ids if detokenize and stop_token_ids is None else list(stop_token_ids or ())
        return NewRequest(ids, generation.sampling_params(exe, seed, text, **knobs), max_tokens, tuple(eos),
                          (stop,) if isinstance(stop, str) else tuple(stop), detokenize, skip_special_tokens,
                          logprobs, request_id, sample)

    def enqueue(self, new: NewRequest) -> str:
        """Queue a checked request; returns its id (`new.request_id`, or the next free one)."""
        req = generation.Request(new.params, new.max_tokens, frozenset(new.eos), new.stop, None,
                                 self.exe.tokenizer if new.detokenize else None, new.skip_special_tokens)
        with self._lock:
            rid = new.request_id or f"req-{next(self._ids)}"
            if any(s.rid == rid for s in self.waiting + self.running):
                raise InputError(f"request id {rid!r} is already in the engine")
            seq = _Seq(rid, list(new.ids), req, new.sample, self.exe.device, next(self._ids))
            seq.top_logprobs = new.logprobs
            req.on_text = lambda _, piece: seq.text.append(piece)
            self.waiting.append(seq)
        return rid

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks; False when it is not (or no longer) in the engine."""
        with self._lock:
            for queue in (self.waiting, self.running):
                for s in queue:
                    if s.rid == request_id:
                        self._leave(s, queue)
                        return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # scheduling -------------------------------------------------------------------------------
    def _grow(self, seq: _Seq, upto: int) -> bool:
        need = self.pool.blocks_for(upto) - len(seq.table)
        got = self.pool.allocate(need) if need > 0 else []
        if got is None:
            return False
        seq.table += got
        return True

    def _leave(self, seq: _Seq, queue: list[_Seq]) -> None:
        """`seq` out of `queue` (finished, aborted or preempted): its blocks and block-table row are given back."""
        queue.remove(seq)
        self.pool.release(seq.table)
        seq.table, seq.hashes = [], []
        if seq.slot is not None:
            self.slots.release(seq.slot)
            seq.slot = None
        if self.tables is not None:
            self.tables.drop(seq.rid)
        if self.compact is not None:
            self.compact.drop(seq.rid)

    def _preempt(self, seq: _Seq) -> None:
        self._leave(seq, self.running)
        seq.computed = 0
        self.waiting.insert(0, seq)
        self.preemptions += 1

    def _schedule(self) -> list[tuple[_Seq, int]]:
        """(request, tokens to compute) for this step: running requests first (oldest first), then admissions."""
        plan, budget = [], self.budget
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq not in self.running or budget == 0:
                continue
            n = min(seq.pending(), budget)
            while not self._grow(seq, seq.computed + n):
                victim = max(self.running, key=lambda s: s.arrival)
                plan = [(s, k) for s, k in plan if s is not victim]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                plan.append((seq, n))
                budget -= n
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if self.prefix_caching and not seq.table:
                seq.table = self.pool.match_prefix(seq.tokens[:-1])    # the last token is always computed
                seq.computed = len(seq.table) * self.pool.block_size
            n = min(seq.pending(), budget)
            if not self._grow(seq, seq.computed + n):
                self.pool.release(seq.table)
                seq.table, seq.computed = [], 0
                break
            self.waiting.pop(0)
            self.running.append(seq)
            if self.slots is not None:
                seq.slot = self.slots.acquire()   # the empty state: it prefills from its first token
            plan.append((seq, n))
            budget -= n
        return plan

    # one iteration ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, launched: Callable[[], None] | None = None) -> list[RequestOutput]:
        """Schedule, run the step's graph calls (paged: one for the decode rows, one for the prefill chunks; else
        one per (cache length, chunk) group), sample, report what changed.
        `launched` is called once the step's graph calls are issued, before the host waits for their results:
        a server hands the previous step's outputs to its clients there, while the device runs this one."""
        with self._lock:
            plan = self._schedule()
            paged, packed = self.paged is not None, self.paged is not None and self.slots is None
            singles = [s for s, n in plan if n == 1 and paged]
            chunks = [(s, n) for s, n in plan if n > 1 and packed]   # fixed-size states advance token by token
            groups: dict[tuple[int, int], list[_Seq]] = {}
            for seq, n in plan:
                if not (n == 1 and paged or n > 1 and packed):
                    groups.setdefault((seq.computed, n), []).append(seq)
            issued = [self._run_paged(singles)] if singles else []
            issued += [self._run_prefill(chunks)] if chunks else []
            issued += [self._run_group(seqs, start, n) for (start, n), seqs in groups.items()]
            if launched is not None:
                launched()
            for seqs, ns, last in issued:
                self._computed(seqs, ns, last)
            return [o for o in (self._report(s) for s, _ in plan) if o is not None]

    def _run_group(self, seqs: list[_Seq], start: int, n: int) -> tuple[list[_Seq], list[int], torch.Tensor]:
        """One graph call for `seqs` (n tokens each after `start`) over their gathered caches; (seqs, tokens
        computed of each, the logits after each one's last token [len(seqs), V])."""
        exe, tables = self.exe, [s.table for s in seqs]
        ids = torch.tensor([s.tokens[start:start + n] for s in seqs], dtype=torch.int64, device=exe.device)
        slots = [s.slot for s in seqs]
        rids = [s.rid for s in seqs]
        caches = {**self.pool.gather(tables, start), **(self.slots.gather(slots) if self.slots else {}),
                  **(self.compact.gather(rids, start) if self.compact else {})}
        out, state = exe.step(ids, KVState(caches, start, len(seqs)))
        self.pool.write(tables, state.caches, start, start + n)
        if self.slots is not None:
            self.slots.write(slots, state.caches)
        if self.compact is not None:
            self.compact.write(rids, state.caches)
        self.calls["contiguous"] += 1
        return seqs, [n] * len(seqs), out["logits"][:, -1]

    def _run_paged(self, seqs: list[_Seq]) -> tuple[list[_Seq], list[int], torch.Tensor]:
        """One token of each of `seqs` (any cache lengths) in one paged decode call over the pools. The step's
        integer inputs are made on the host as one tensor (block tables from their persistent rows) and copied
        to the device once."""
        page, computed = self.pool.block_size, [s.computed for s in seqs]
        self.exe._check_length(max(computed) + 1)
        rows = [[s.tokens[p], p, s.table[p // page] * page + p % page, p + 1, s.slot or 0]
                for s, p in zip(seqs, computed)]
        host = torch.cat([torch.tensor(rows), self.tables.rows([(s.rid, s.table) for s in seqs]).long()], 1)
        self.pool.check_rows(host[:, 5:], host[:, 2:3], host[:, 3], host[:, 1:2])
        dev = host.to(self.exe.device)        # the one host-to-device copy of the step's inputs
        inputs = {"input_ids": dev[:, 0:1].contiguous(), "positions": dev[:, 1:2].contiguous(), **self.pool.storage,
                  "block_table": dev[:, 5:].int().contiguous(), "cache_slots": dev[:, 2:3].contiguous(),
                  "cache_lens": dev[:, 3].int()}
        if self.slots is not None:   # the state pools and each row's slot in them
            inputs.update(self.slots.storage, state_slots=dev[:, 4].contiguous())
        out = self.paged(inputs, self.pool.pad_slot)
        self.calls["paged_decode"] += 1
        return seqs, [1] * len(seqs), out["logits"][:, -1]

    def _run_prefill(self, plan: list[tuple[_Seq, int]]) -> tuple[list[_Seq], list[int], torch.Tensor]:
        """Every prefill chunk of the step (request, tokens to compute) in one paged call, packed into rows of one
        bucketed length (packing.py); its integer inputs made on the host and copied to the device at once."""
        seqs, ns = [s for s, _ in plan], [n for _, n in plan]
        self.exe._check_length(max(s.computed + n for s, n in plan))
        packed = pack([Chunk(s.tokens[s.computed:s.computed + n], s.computed, s.table) for s, n in plan],
                      self.pool.block_size, self.pool.pad_slot)
        self.pool.check_rows(packed.table, packed.slots, packed.lens, packed.positions)
        host = torch.cat([packed.ids, packed.positions, packed.slots, packed.lens[:, None].long(),
                          packed.table.long()], 1)
        dev, s = host.to(self.exe.device), packed.ids.shape[1]   # the one host-to-device copy of the inputs
        inputs = {"input_ids": dev[:, :s].contiguous(), "positions": dev[:, s:2 * s].contiguous(),
                  **self.pool.storage, "cache_slots": dev[:, 2 * s:3 * s].contiguous(),
                  "cache_lens": dev[:, 3 * s].int(), "block_table": dev[:, 3 * s + 1:].int().contiguous()}
        out = self.paged.prefill(inputs)
        self.calls["paged_prefill"] += 1
        return seqs, ns, out["logits"][torch.tensor(packed.last, device=dev.device), -1]

    def _computed(self, seqs: list[_Seq], ns: list[int], last: torch.Tensor) -> None:
        """`seqs` have ns more cache rows each: register the blocks that filled, sample where the whole history is
        in, from `last` [len(seqs), V] (the logits after each one's newest token)."""
        ready = []
        for k, (seq, n) in enumerate(zip(seqs, ns)):
            seq.computed += n
            if self.prefix_caching:
                self.pool.register(seq.table, seq.tokens, seq.computed, seq.hashes)
            if seq.computed == len(seq.tokens):
                ready.append((k, seq))
        if ready:
            self._sample(ready, last)

    def _sample(self, ready: list[tuple[int, _Seq]], last: torch.Tensor) -> None:
        """The next token of each (row k of `last` [B, V], request): the rows with equal knobs (seeds aside: each
        row draws from its own stream) in one sampler call, every id and logprob copied to the host at once."""
        groups: dict[SamplingParams, list[tuple[int, _Seq]]] = {}
        for k, seq in ready:
            groups.setdefault(seq.knobs, []).append((k, seq))
        order, picked = [], []
        for params, rows in groups.items():
            x = last[torch.tensor([k for k, _ in rows], device=last.device)]
            seen = torch.cat([seen_mask(torch.tensor([s.tokens], device=x.device), x.shape[-1]) for _, s in rows]) \
                if params.penalized else None
            picked.append(next_tokens(x, params, [s.gen for _, s in rows], seen)[:, 0])
            order += rows
        toks = torch.cat(picked)
        wanted = [(i, k, s) for i, (k, s) in enumerate(order) if s.top_logprobs is not None]
        if wanted:
            lp = torch.log_softmax(last[torch.tensor([k for _, k, _ in wanted], device=last.device)].float(), -1)
            chosen = lp.gather(1, toks[[i for i, _, _ in wanted]][:, None])[:, 0]
            top = torch.topk(lp, max(s.top_logprobs for _, _, s in wanted))
            host = (chosen.tolist(), top.indices.tolist(), top.values.tolist())
            for (_, _, seq), value, ids, values in zip(wanted, *host):
                seq.logprobs.append((value, dict(zip(ids[:seq.top_logprobs], values[:seq.top_logprobs]))))
        for (_, seq), tok in zip(order, toks.tolist()):
            self._push(seq, tok)

    def _push(self, seq: _Seq, tok: int) -> None:
        if not seq.row.tokens:
            seq.row.ttft = time.perf_counter() - seq.t0
        seq.tokens.append(tok)
        seq.row.push(tok)

    def _report(self, seq: _Seq) -> RequestOutput | None:
        new = seq.row.tokens[seq.sent:]
        done = seq.row.finish is not None
        if not new and not done:
            return None
        seq.sent = len(seq.row.tokens)
        text, seq.text = "".join(seq.text), []
        logprobs, seq.logprobs = (seq.logprobs if seq.top_logprobs is not None else None), []
        if done and seq in self.running:
            self._leave(seq, self.running)
        return RequestOutput(seq.rid, new, text, done, seq.row.finish, len(seq.prompt), len(seq.row.tokens),
                             list(seq.row.tokens), logprobs)

    def generate(self, prompts: list, max_tokens: int = 16, **options) -> list[RequestOutput]:
        """Every prompt through the engine at once until all finish; the final output of each, in order."""
        rids = [self.add_request(p, max_tokens, **options) for p in prompts]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            final.update({o.request_id: o for o in self.step() if o.finished})
        return [final[r] for r in rids]
