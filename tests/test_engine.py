"""The continuous-batching engine: concurrent ragged requests (chunked prefill mixed with decode) each equal
their own `generate` (greedy) on eager and triton; preemption by recompute, prefix-cache hits and abort change
no output and leak no blocks."""
from __future__ import annotations

import hf_fixtures as fx
import pytest
import torch

import dsgraph
from dsgraph.errors import InputError
from dsgraph.serve.engine import Engine

_one_thread = pytest.fixture(scope="module", autouse=True)(fx.one_thread)
LENS, MAXES = (3, 17, 9, 40, 5, 33), (5, 8, 3, 6, 7, 4)


def _exe(backend):
    return dsgraph.compile(dsgraph.load("deepseek-v2-lite-tiny"), backend=backend, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def eager():
    return _exe("eager")


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in LENS]


def _alone(exe, prompts, maxes=MAXES):
    return [exe.generate([p], max_new_tokens=k)[0].tolist() for p, k in zip(prompts, maxes)]


def _run(eng, prompts, maxes=MAXES):
    rids = [eng.add_request(p, k) for p, k in zip(prompts, maxes)]
    final = {}
    while eng.has_unfinished():
        final.update({o.request_id: o for o in eng.step() if o.finished})
    assert eng.pool.used == 0                  # finished requests gave back every block
    return [final[r].token_ids for r in rids]


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_concurrent_requests_equal_running_alone(backend, eager):
    exe = eager if backend == "eager" else _exe(backend)
    # the interpreter is slow: triton gets three requests (one prefilled in two chunks), eager all six
    prompts, maxes = (_prompts(), MAXES) if backend == "eager" else (_prompts()[:3], (3, 4, 2))
    eng = Engine(exe, max_num_seqs=2, max_num_batched_tokens=12, block_size=4)
    assert _run(eng, prompts, maxes) == _alone(eng.exe, prompts, maxes)
    assert eng.preemptions == 0


def test_preemption_by_recompute_keeps_outputs(eager):
    prompts = _prompts(1)
    eng = Engine(eager, max_num_seqs=6, max_num_batched_tokens=64, block_size=4, num_blocks=13)
    assert _run(eng, prompts) == _alone(eager, prompts)
    assert eng.preemptions > 0


def test_prefix_cache_hits_and_keeps_outputs(eager):
    system = _prompts(2)[3]                     # 40 shared tokens: 10 full blocks of 4
    prompts = [system + p for p in _prompts(3)]
    eng = Engine(eager, max_num_seqs=1, block_size=4)
    assert _run(eng, prompts) == _alone(eager, prompts)
    assert eng.pool.hits >= 10 * (len(prompts) - 1)


def test_seeded_sampling_and_text_match_generate(eager):
    eng = Engine(eager, max_num_seqs=3)
    outs = eng.generate(["Hello", "the model"], 6, temperature=0.8, top_p=0.9, seed=7, stop_token_ids=[])
    for prompt, o in zip(["Hello", "the model"], outs):
        ref = eager.generate(prompt, 6, temperature=0.8, top_p=0.9, seed=7, stop_token_ids=[])
        assert (o.token_ids, o.finish_reason) == (ref.token_ids, "length")


def test_abort_frees_blocks_and_errors_are_named(eager):
    eng = Engine(eager, max_num_seqs=2, block_size=4)
    rid = eng.add_request(_prompts()[3], 8)
    eng.step()
    assert eng.pool.used > 0 and eng.abort(rid) and not eng.abort(rid)
    assert eng.pool.used == 0 and not eng.has_unfinished()
    with pytest.raises(InputError, match="max_tokens"):
        eng.add_request([1, 2], 0)
    with pytest.raises(InputError, match="vocabulary"):
        eng.add_request([1, 10**6], 4)
    with pytest.raises(InputError, match="blocks"):
        Engine(eager, block_size=4, num_blocks=2).add_request(_prompts()[3], 4)
