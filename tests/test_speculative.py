"""MTP speculative decoding gives exactly the plain greedy tokens, with drafts that are all
rejected, all accepted, or a mix; cache rollback leaves the cache a plain run would build."""
import dsgraph.models as models
import pytest
import torch

import dsgraph
from dsgraph.errors import InputError
from dsgraph.runtime import generation
from dsgraph.runtime.speculative import speculate

V3 = "deepseek-v3-tiny"


def bigram_model(mtp_agrees: bool):
    """Zero every residual branch of the main model so its next token depends on the current token
    only; route the MTP branch to the same function (mtp_agrees) or one row off (always wrong)."""
    m = models.build_model(V3, seed=5)
    w, cfg = m.weights, m.config
    L = cfg.num_hidden_layers
    for name in list(w):
        if name.startswith(f"model.layers.{L}."):
            continue
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w.set(name, torch.zeros_like(w[name]))
    d = cfg.hidden_size
    p = f"model.layers.{L}"
    for name in list(w):
        if name.startswith(p + ".") and name.endswith(("o_proj.weight", "down_proj.weight")):
            w.set(name, torch.zeros_like(w[name]))
    eh = torch.zeros(d, 2 * d)
    eh[:, :d] = torch.eye(d)                              # keep enorm(embed(t+1)), drop the hidden
    w.set(f"{p}.eh_proj.weight", eh)
    w.set(f"{p}.enorm.weight", torch.ones(d))
    w.set(f"{p}.embed_tokens.weight", w["model.embed_tokens.weight"])
    w.set(f"{p}.shared_head.norm.weight", w["model.norm.weight"])
    head = w["lm_head.weight"]
    w.set(f"{p}.shared_head.head.weight", head if mtp_agrees else torch.roll(head, 1, dims=0))
    return m


def plain_and_spec(model, prompt, n, depth, backend="eager", device="cpu"):
    exe = dsgraph.compile(model, backend=backend, device=device, keep_mtp=True)
    ref = exe.generate(prompt, n)
    out, state, stats = speculate(exe, prompt, n, depth)
    return exe, ref, out, state, stats


def _backend(name):
    from dsgraph.backends import available_backends
    if name not in available_backends("cpu"):
        pytest.skip(f"{name} backend unavailable here")
    return name


BACKENDS = ["eager", "tvm"]   # triton's in-place caches: the rollback and random-draft tests below (CI time)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("depth", [1, 3])
def test_all_drafts_accepted(backend, depth):
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    exe, ref, out, _, stats = plain_and_spec(bigram_model(True), prompt, 7, depth, _backend(backend))
    assert torch.equal(out, ref)
    assert stats.extra["acceptance_per_position"] == [1.0] * depth
    assert stats.target_steps < 7
    eager = dsgraph.compile(bigram_model(True), keep_mtp=True).generate(prompt, 7)
    assert torch.equal(out, eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_drafts_rejected(backend):
    prompt = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(1))
    _, ref, out, _, stats = plain_and_spec(bigram_model(False), prompt, 5, 2, _backend(backend))
    assert torch.equal(out, ref)
    assert stats.extra["acceptance_per_position"] == [0.0, 0.0]
    assert stats.target_steps == 5


@pytest.mark.parametrize("backend,batch,depth,seed", [("eager", 1, 1, 0), ("eager", 2, 2, 1), ("eager", 4, 1, 2),
                                                     ("triton", 2, 2, 3), ("tvm", 3, 2, 4)])
def test_random_mtp_matches_plain_greedy(backend, batch, depth, seed):
    model = models.build_model(V3, seed=seed)
    prompt = torch.randint(0, 256, (batch, 6), generator=torch.Generator().manual_seed(seed))
    _, ref, out, _, _ = plain_and_spec(model, prompt, 6, depth, _backend(backend))
    assert torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_speculation_on_cuda_matches_plain_greedy(backend):
    """Acceptance bookkeeping mixes device tensors (logits, drafts) with host counters."""
    model = models.build_model(V3, seed=3)
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    _, ref, out, _, _ = plain_and_spec(model, prompt, 6, 2, backend, device="cuda")
    assert torch.equal(out.cpu(), ref.cpu())


def test_mixed_acceptance_within_a_batch_stays_exact():
    """Rows whose drafts agree for different lengths: the step accepts the shortest, output stays exact."""
    model = bigram_model(True)
    w = model.weights
    p = f"model.layers.{model.config.num_hidden_layers}"
    head = w[f"{p}.shared_head.head.weight"].clone()
    head[::3] = torch.roll(head, 1, dims=0)[::3]      # drafts go wrong for a third of the vocabulary
    w.set(f"{p}.shared_head.head.weight", head)
    prompt = torch.randint(0, 256, (4, 5), generator=torch.Generator().manual_seed(7))
    _, ref, out, _, stats = plain_and_spec(model, prompt, 10, 2)
    assert torch.equal(out, ref)
    assert 0.0 < stats.extra["acceptance_per_position"][0] < 1.0


@pytest.mark.parametrize("backend,accept", [("eager", True), ("eager", False), ("triton", False)],
                         ids=["eager-accepted", "eager-rejected", "triton-rejected"])
def test_cache_rollback_equals_plain_cache(backend, accept):
    """triton grows caches in place: rollback rewinds them, and the next step overwrites the rejected rows."""
    model = bigram_model(accept)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    exe, ref, out, state, _ = plain_and_spec(model, prompt, 7, 2, _backend(backend))
    _, plain = exe.prefill(prompt)
    for i in range(out.shape[1] - 1):
        _, plain = exe.decode(out[:, i:i + 1], plain)
    assert state.length == plain.length == 5 + 6
    for name, t in plain.caches.items():
        torch.testing.assert_close(state.caches[name], t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,agree", [("eager", None), ("eager", True)], ids=["random", "agreeing"])
def test_ragged_prompts_speculate_in_one_batch(backend, agree, monkeypatch):
    """Longer prompts' tails are fed before drafting starts; each row's greedy output is its output alone."""
    model = models.build_model(V3, seed=6) if agree is None else bigram_model(agree)
    exe = dsgraph.compile(model, backend=_backend(backend), keep_mtp=True)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    alone = [exe.generate(torch.tensor([r]), 6)[0].tolist() for r in rows]
    batches, real = [], generation.speculate
    monkeypatch.setattr(generation, "speculate", lambda exe, p, *a: batches.append(len(p)) or real(exe, p, *a))
    assert exe.generate(rows, 6, speculative="mtp", draft_depth=2).tolist() == alone
    assert batches == [3]
    if agree:
        _, _, stats = speculate(exe, rows, 6, 2)
        assert stats.extra["acceptance_per_position"] == [1.0, 1.0]


def test_speculation_stops_at_max_time_and_when_every_row_has_stopped(monkeypatch):
    exe = dsgraph.compile(bigram_model(True), keep_mtp=True)
    out = exe.generate("Hello!", max_new_tokens=50, max_time=0.0, temperature=0, speculative="mtp",
                       stop_token_ids=[])
    assert out.finish_reason == "length" and out.completion_tokens == 1
    free = exe.generate("Hello!", max_new_tokens=12, temperature=0, stop_token_ids=[])
    steps, real = [], exe.step
    monkeypatch.setattr(exe, "step", lambda ids, state: steps.append(ids.shape) or real(ids, state))
    eos = exe.generate("Hello!", max_new_tokens=12, temperature=0, speculative="mtp", draft_depth=2,
                       stop_token_ids=[free.token_ids[2]])
    assert eos.finish_reason == "eos" and eos.token_ids == free.token_ids[:free.token_ids.index(free.token_ids[2]) + 1]
    assert len(steps) <= 3     # prefill and at most two draft-verify steps of 3 tokens: no steps after the EOS


def test_model_without_mtp_is_a_clear_error():
    exe = dsgraph.compile(models.build_model("deepseek-v2-lite-tiny"))
    with pytest.raises(InputError, match="MTP"):
        exe.generate([1, 2, 3], 4, speculative="mtp")
    with pytest.raises(InputError, match="only speculative mode"):
        exe.generate([1, 2, 3], 4, speculative="eagle")
