"""MTP speculative decoding gives exactly the plain greedy tokens, with drafts that are all
rejected, all accepted, or a mix; cache rollback leaves the cache a plain run would build."""
import pytest
import torch

import dsgraph
import models
from backends.speculative import speculate
from dsgraph.errors import InputError

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


def plain_and_spec(model, prompt, n, depth):
    exe = dsgraph.compile(model, keep_mtp=True)
    ref = exe.generate(prompt, n)
    out, state, stats = speculate(exe, prompt, n, depth)
    return exe, ref, out, state, stats


@pytest.mark.parametrize("depth", [1, 3])
def test_all_drafts_accepted(depth):
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    _, ref, out, _, stats = plain_and_spec(bigram_model(True), prompt, 10, depth)
    assert torch.equal(out, ref)
    assert stats.extra["acceptance_per_position"] == [1.0] * depth
    assert stats.target_steps < 10


def test_all_drafts_rejected():
    prompt = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(1))
    _, ref, out, _, stats = plain_and_spec(bigram_model(False), prompt, 8, 2)
    assert torch.equal(out, ref)
    assert stats.extra["acceptance_per_position"] == [0.0, 0.0]
    assert stats.target_steps == 8


@pytest.mark.parametrize("batch,depth,seed", [(1, 1, 0), (2, 2, 1), (4, 1, 2)])
def test_random_mtp_matches_plain_greedy(batch, depth, seed):
    model = models.build_model(V3, seed=seed)
    prompt = torch.randint(0, 256, (batch, 6), generator=torch.Generator().manual_seed(seed))
    _, ref, out, _, _ = plain_and_spec(model, prompt, 9, depth)
    assert torch.equal(out, ref)


def test_cache_rollback_equals_plain_cache():
    model = bigram_model(True)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    exe, ref, out, state, _ = plain_and_spec(model, prompt, 7, 2)
    _, plain = exe.prefill(prompt)
    for i in range(out.shape[1] - 1):
        _, plain = exe.decode(out[:, i:i + 1], plain)
    assert state.length == plain.length == 5 + 6
    for name, t in plain.caches.items():
        torch.testing.assert_close(state.caches[name], t, rtol=1e-5, atol=1e-5)


def test_model_without_mtp_is_a_clear_error():
    exe = dsgraph.compile(models.build_model("deepseek-v2-lite-tiny"))
    with pytest.raises(InputError, match="MTP"):
        exe.generate([1, 2, 3], 4, speculative="mtp")
    with pytest.raises(InputError, match="only speculative mode"):
        exe.generate([1, 2, 3], 4, speculative="eagle")
