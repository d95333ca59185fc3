"""MTP speculation on DeepSeek-V4 (tiny: sliding, CSA and HCA layers; the MTP block): the output is plain greedy
decoding's while drafts are accepted, partly accepted and rejected, and the rollback leaves every cache — the
fixed-size sliding-window and compressor states included — as plain decoding builds it."""
from __future__ import annotations

import pytest
import torch
from dsgraph.models import build_model
from v4_fixtures import one_thread  # noqa: F401 (autouse fixture)

import dsgraph
from dsgraph.errors import InputError
from dsgraph.numerics import rel_err
from dsgraph.runtime import speculative
from dsgraph.runtime.speculative import speculate

V4 = "deepseek-v4-tiny"
P, N = 6, 10      # positions 0..15: past the window (8), two HCA groups (8), several CSA groups (4)


def _exe(backend="eager", device="cpu", seed=2):
    return dsgraph.compile(build_model(V4, seed=seed), backend=backend, device=device, keep_mtp=True)


def forced_drafts(monkeypatch, ref, prompt_len):
    """The MTP block runs as usual, but its drafts are replaced by the plain greedy tokens `ref` [B, N] in turn
    all right, right then wrong, all wrong (wrong: the right token + 1), so every kind of acceptance happens."""
    real, calls = speculative.MTPDrafter.draft, []

    def draft(self, hidden, next_ids, state, depth, pick):
        drafts, qs, state_after = real(self, hidden, next_ids, state, depth, pick)
        first = state.length + next_ids.shape[1] + 1 - prompt_len     # index in `ref` of the first draft
        right = torch.stack([ref[:, j] if j < ref.shape[1] else ref[:, -1] for j in range(first, first + depth)], 1)
        wrong = torch.tensor([[0, 0], [0, 1], [1, 1]][len(calls) % 3][:depth])
        calls.append(first)
        return (right + wrong) % 128, qs, state_after
    monkeypatch.setattr(speculative.MTPDrafter, "draft", draft)
    return calls


def test_v4_speculation_rolls_back_the_state_caches_exactly(monkeypatch):
    exe = _exe()
    prompt = torch.randint(0, 128, (2, P), generator=torch.Generator().manual_seed(4))
    ref = exe.generate(prompt, N)
    calls = forced_drafts(monkeypatch, ref, P)
    out, state, stats = speculate(exe, prompt, N, 2)
    assert torch.equal(out, ref)
    acc = stats.extra["acceptance_per_position"]
    assert 0 < acc[1] < acc[0] < 1 and stats.target_steps < N and len(calls) > 3
    _, plain = exe.prefill(prompt)
    for i in range(N - 1):
        _, plain = exe.decode(out[:, i:i + 1], plain)
    assert state.length == plain.length == P + N - 1
    assert any(str(v.type.shape[1]) != "T" for v in exe.cache_inputs.values())   # fixed-size states are there
    for name, t in plain.caches.items():   # fp32 rounding of 3-token verify steps against 1-token decode steps
        assert state.caches[name].shape == t.shape and rel_err(state.caches[name], t) < 1e-5, name


def test_v4_random_mtp_drafts_give_plain_greedy_on_triton():
    """The interpreter is slow: one verify step past the window; triton's plain decoding is test_v4_backends'."""
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    want = _exe(seed=5).generate(prompt, 2)
    assert torch.equal(_exe("triton", seed=5).generate(prompt, 2, speculative="mtp"), want)


def test_draft_depth_past_the_state_rows_is_a_clear_error():
    with pytest.raises(InputError, match="draft_depth <= 6"):
        _exe().generate([1, 2, 3], 4, speculative="mtp", draft_depth=7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_v4_speculation_on_cuda_matches_plain_greedy():
    exe = _exe("triton", device="cuda", seed=3)
    prompt = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3)).cuda()
    assert torch.equal(exe.generate(prompt, 8, speculative="mtp", draft_depth=2).cpu(), exe.generate(prompt, 8).cpu())
