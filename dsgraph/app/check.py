"""Compare a backend against eager on one model: logits (prefill and a cached decode
step) and greedy tokens. Used by `dsgraph check`, `dsgraph demo` and the tests."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dsgraph.numerics import rel_err, tolerance

from . import api


@dataclass
class BackendCheck:
    """A backend against the eager fp32 oracle on one model: logits of a prefill and a cached decode step, and greedy
    tokens (`passes.CheckResult` is the other comparison: a graph before and after a pass)."""

    backend: str
    device: str
    dtype: str
    prefill_err: float
    decode_err: float
    tokens: list
    tokens_match: bool
    seconds: float
    compile_seconds: float
    fallbacks: int

    @property
    def ok(self) -> bool:
        tol = tolerance(self.dtype)
        return self.tokens_match and self.prefill_err <= tol and self.decode_err <= tol


def make_prompt(vocab: int, batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def check_backend(model, backend: str, device: str = "cpu", dtype: str = "float32", prompt=None,
                  new_tokens: int = 4, reference=None, **compile_options) -> BackendCheck:
    """Compile `model` for `backend` and compare it with eager (fp32 reference)."""
    prompt = make_prompt(model.config.vocab_size) if prompt is None else prompt
    ref = reference or api.compile(model, backend="eager", device="cpu", dtype="float32")
    ref_logits, ref_state = ref.prefill(prompt)
    nxt = ref_logits[:, -1:].argmax(-1)
    ref_dec, _ = ref.decode(nxt, ref_state)
    ref_tokens = ref.generate(prompt, max_new_tokens=new_tokens)

    t0 = time.perf_counter()
    exe = api.compile(model, backend=backend, device=device, dtype=dtype, **compile_options)
    compile_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    logits, state = exe.prefill(prompt)
    dec, _ = exe.decode(nxt, state)
    tokens = exe.generate(prompt, max_new_tokens=new_tokens)
    secs = time.perf_counter() - t1
    return BackendCheck(backend, device, dtype, rel_err(logits.cpu(), ref_logits), rel_err(dec.cpu(), ref_dec),
                       tokens.cpu().tolist(), bool(torch.equal(tokens.cpu(), ref_tokens)), secs, compile_s,
                       len(exe.compiled.report.fallbacks))


