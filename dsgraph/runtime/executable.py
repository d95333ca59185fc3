"""The runtime every backend shares: KV-cache state, prefill/decode steps and greedy
generation over a `CompiledGraph`.

The graph updates caches functionally (cache in, cache.next out); the Executable
threads them from step to step, so a backend only has to compute one step.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch

from dsgraph.dtypes import to_torch
from dsgraph.errors import InputError

from . import generation
from .artifact import save_artifact
from .checks import FiniteWatch, check_count, ids_tensor
from .localize import localize
from .sampling import SamplingParams, StepSampler
from .speculative import generate_mtp
from .state import GenerateStats, KVState

SAMPLERS_KEPT = 8


class Executable:
    """A compiled model: `exe(ids)` -> logits, `prefill`/`decode` over a KVState, `generate`."""

    def __init__(self, model, graph, compiled, device: str, dtype: str, pass_records=(), mtp=None, weights=None):
        self.model = model
        self.weights = weights if weights is not None else model.weights  # after the passes' transforms
        self.mtp = mtp  # (branch graph, its CompiledGraph) when compiled with keep_mtp
        self.graph = graph
        self.compiled = compiled
        self.device = torch.device(device)
        self.dtype = dtype
        self.pass_records = list(pass_records)
        self.tokenizer = getattr(model, "tokenizer", None)   # dsgraph.text.Tokenizer, where the model ships one
        meta = graph.meta
        self.vocab_size = meta.get("vocab_size")
        self.max_positions = meta.get("max_position_embeddings")
        self.cache_inputs = {n: v for n, v in graph.inputs.items() if v.kind == "cache"}
        self._samplers: dict[tuple, StepSampler] = {}

    # input checking --------------------------------------------------------------
    def _ids(self, ids, what: str = "input_ids", device=None) -> torch.Tensor:
        """ids checked (an integer [B, S] of the vocabulary) on `device` (default: the executable's)."""
        if isinstance(ids, (list, tuple)):
            ids = ids_tensor(ids, what)
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"{what} must be an integer tensor [B, S] or a list of ints, got {type(ids).__name__}"
                             + (f" of {ids.dtype}" if isinstance(ids, torch.Tensor) else ""))
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise InputError(f"{what} must be [batch, seq], got shape {tuple(ids.shape)}")
        if ids.shape[1] == 0 or ids.shape[0] == 0:
            raise InputError(f"{what} is empty (shape {tuple(ids.shape)}): give at least one token per sequence")
        if self.vocab_size is not None:
            bad = (ids < 0) | (ids >= self.vocab_size)
            if bad.any():
                tok = int(ids[bad][0])
                raise InputError(f"{what} holds token id {tok}, outside the vocabulary [0, {self.vocab_size}); "
                                 "check the tokenizer matches the model")
        return ids.to(device or self.device, torch.int64)

    def text_rows(self, prompt) -> tuple[list[list[int]], bool]:
        """Token id rows of a text prompt (a string, strings, or a chat) and whether one output was asked for."""
        return generation.text_rows(self, prompt)

    def _check_length(self, total: int) -> None:
        if self.max_positions is not None and total > self.max_positions:
            raise InputError(f"sequence of {total} tokens exceeds max_position_embeddings={self.max_positions}; "
                             "shorten the prompt or max_new_tokens")

    # steps -------------------------------------------------------------------------
    def empty_state(self, batch: int) -> KVState:
        return self.empty_state_for(self.graph, batch)

    def empty_state_for(self, graph, batch: int) -> KVState:
        caches = {name: torch.zeros(v.type.concrete({"B": batch, "T": 0}), dtype=to_torch(v.type.dtype),
                                    device=self.device)
                  for name, v in graph.inputs.items() if v.kind == "cache"}
        return KVState(caches, 0, batch)

    def step_inputs(self, ids: torch.Tensor, state: KVState, extra: dict | None = None) -> dict:
        """The graph inputs that run S new tokens after `state`."""
        b, s = ids.shape
        if b != state.batch:
            raise InputError(f"batch of {b} sequences does not match the cache's batch of {state.batch}")
        self._check_length(state.length + s)
        positions = torch.arange(state.length, state.length + s, device=self.device).expand(b, s)
        return {"input_ids": ids, "positions": positions, **state.caches, **(extra or {})}

    def step(self, ids: torch.Tensor, state: KVState, extra: dict | None = None, epilogue=None):
        """Run S new tokens after `state`; returns (outputs dict, new state). One-token steps take the backend's
        `decode_step` where it has one (CUDA graphs), which captures `epilogue` (a StepSampler) with the step;
        elsewhere it runs after the step, on the device all the same."""
        inputs = self.step_inputs(ids, state, extra)
        fast = self.compiled.decode_step if ids.shape[1] == 1 and not extra else None
        out = fast(inputs, state.length, epilogue) if fast is not None else None
        if out is None:
            out = self.compiled.run(inputs)
            out = out if epilogue is None else {**out, **epilogue(out)}
        b, s = ids.shape
        caches = {name: out[self.graph.cache_map[name]] for name in self.cache_inputs}
        return out, KVState(caches, state.length + s, b)

    def step_sampler(self, params: SamplingParams, batch: int) -> StepSampler:
        """The StepSampler for `batch` rows under `params` (its seed aside), kept so that decode graphs captured
        with it are replayed by later calls; the oldest of more than SAMPLERS_KEPT is dropped."""
        key = (batch, replace(params, seed=None))
        if key not in self._samplers:
            if len(self._samplers) >= SAMPLERS_KEPT:
                self._samplers.pop(next(iter(self._samplers)))
            self._samplers[key] = StepSampler(params, batch, self.vocab_size, self.device)
        return self._samplers[key]

    def __call__(self, input_ids) -> torch.Tensor:
        """Full-sequence forward from an empty cache: logits [B, S, vocab] (fp32)."""
        ids = self._ids(input_ids)
        out, _ = self.step(ids, self.empty_state(ids.shape[0]))
        return out["logits"]

    def prefill(self, input_ids):
        ids = self._ids(input_ids)
        out, state = self.step(ids, self.empty_state(ids.shape[0]))
        return out["logits"], state

    def decode(self, token_ids, state: KVState):
        ids = self._ids(token_ids, "token_ids")
        out, state = self.step(ids, state)
        return out["logits"], state

    def localize(self, input_ids, state: KVState | None = None, tolerance: float | None = None):
        """The nodes whose kernels disagree with their op's torch reference on this step (see
        dsgraph.runtime.localize); `state` None means a prefill from an empty cache."""
        ids = self._ids(input_ids)
        state = state or self.empty_state(ids.shape[0])
        return localize(self.compiled, self.step_inputs(ids, state), tolerance)

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int = 32, speculative: str | None = None,
                 draft_depth: int = 1, return_stats: bool = False,
                 on_token: Callable[[int, torch.Tensor], None] | None = None, **options):
        """Greedy decoding with the KV cache; returns the new tokens [B, max_new_tokens].

        speculative="mtp" drafts with the MTP branch (draft_depth tokens a step) and verifies with
        the main model: the same tokens, fewer main-model steps (dsgraph/runtime/speculative.py).
        Text prompts, ragged id lists and the options of dsgraph.runtime.generation.generate (temperature,
        top_p, top_k, min_p, repetition_penalty, seed, n, stop, stop_token_ids, max_time, on_text) go there.
        """
        max_new_tokens, draft_depth = check_count(max_new_tokens, "max_new_tokens"), check_count(draft_depth,
                                                                                                "draft_depth")
        if generation.wants_generation(prompt_ids, options if speculative is None else {}):
            return generation.generate(self, prompt_ids, max_new_tokens, speculative=speculative,
                                       draft_depth=draft_depth, **options)
        if speculative == "mtp":
            return generate_mtp(self, prompt_ids, max_new_tokens, draft_depth, return_stats, on_token, **options)
        if speculative is not None:
            raise InputError(f"speculative={speculative!r}: the only speculative mode is 'mtp'")
        ids = self._ids(prompt_ids, "prompt_ids")
        self._check_length(ids.shape[1] + max_new_tokens - 1)
        watch = FiniteWatch(self.dtype)
        t0 = time.perf_counter()
        logits, state = self.prefill(ids)
        watch.see(logits[:, -1], 0)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        new = [tok]
        if on_token:
            on_token(0, tok[:, 0])
        t1 = time.perf_counter()
        for i in range(1, max_new_tokens):
            logits, state = self.decode(tok, state)
            watch.see(logits[:, -1], i)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            new.append(tok)
            if on_token:
                on_token(i, tok[:, 0])
        watch.check(max_new_tokens - 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t1
        out = torch.cat(new, dim=1)
        if not return_stats:
            return out
        rate = (max_new_tokens - 1) * ids.shape[0] / dt if max_new_tokens > 1 and dt > 0 else float("nan")
        graphs = getattr(self.compiled.decode_step, "stats", None)
        extra = {"decode_graphs": dict(graphs)} if graphs is not None else {}
        return out, GenerateStats(ids.shape[1], max_new_tokens, max_new_tokens, ttft, rate, extra)

    def report(self) -> str:
        return str(self.compiled.report)

    def save(self, path, overwrite: bool = False):
        """Write a deployable artifact directory (dsgraph/runtime/artifact.py); load it with dsgraph.load_artifact."""
        return save_artifact(self, path, overwrite=overwrite)

    def artifact_parts(self) -> dict:
        """Graphs an artifact holds beside the decoder and its MTP branch: name -> (graph, weights, compiled)."""
        return {}
