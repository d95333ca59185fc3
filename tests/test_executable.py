"""The shared runtime: input validation and generation on the eager backend."""
import dsgraph.models as models
import pytest
import torch

import dsgraph
from dsgraph.errors import BackendUnavailable, InputError


@pytest.fixture(scope="module")
def exe():
    return dsgraph.compile(models.build_model("deepseek-llm-tiny", mtp=False), backend="eager")


def test_generate_is_greedy_over_full_recompute(exe):
    prompt = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(0))
    new = exe.generate(prompt, max_new_tokens=6)
    assert new.shape == (2, 6)
    seq = prompt
    for i in range(6):
        tok = exe(seq)[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(tok[:, 0], new[:, i])
        seq = torch.cat([seq, tok], 1)


def test_generate_stats_and_streaming(exe):
    seen = []
    out, stats = exe.generate([1, 2, 3], max_new_tokens=3, return_stats=True, on_token=lambda i, t: seen.append(i))
    assert seen == [0, 1, 2] and out.shape == (1, 3)
    assert stats.new_tokens == 3 and stats.time_to_first_token_s > 0


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[1, 256]]), "outside the vocabulary"),
    (torch.tensor([[-1]]), "outside the vocabulary"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.tensor([[1.5]]), "integer tensor"),
    ([1.5, 2.0], "integer tensor"),
])
def test_bad_token_ids_are_named(exe, bad, match):
    with pytest.raises(InputError, match=match):
        exe(bad)


def test_too_long_sequence(exe):
    with pytest.raises(InputError, match="max_position_embeddings=512"):
        exe.generate(torch.ones(1, 500, dtype=torch.long), max_new_tokens=20)


def test_batch_mismatch_against_cache(exe):
    _, state = exe.prefill(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(InputError, match="batch"):
        exe.decode(torch.ones(1, 1, dtype=torch.long), state)


def test_unknown_dtype_and_missing_cuda():
    m = models.build_model("deepseek-llm-tiny", mtp=False)
    with pytest.raises(InputError, match="float64|models run in"):
        dsgraph.compile(m, dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            dsgraph.compile(m, device="cuda")
