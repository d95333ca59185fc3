"""The continuous-batching engine: concurrent ragged requests (chunked prefill mixed with decode) each equal
their own `generate` (greedy) on eager (contiguous caches gathered per length group) and on triton (one paged
decode call per step through block tables, padded to a batch bucket; CUDA graphs on a GPU); preemption by
recompute, prefix-cache hits and abort change no output and leak no blocks; V4's fixed-size state caches in one
slot per request and its compact compressed entries kept per request, on the contiguous path (eager, and triton,
whose paged program declines compact caches)."""
from __future__ import annotations

import hf_fixtures as fx
import pytest
import torch

import dsgraph
from dsgraph.errors import InputError
from dsgraph.serve.engine import Engine

_one_thread = pytest.fixture(scope="module", autouse=True)(fx.one_thread)
LENS, MAXES = (3, 17, 9, 40, 5, 33), (5, 8, 3, 6, 7, 4)


def _exe(backend, preset="deepseek-v2-lite-tiny", device="cpu", **options):
    return dsgraph.compile(dsgraph.load(preset), backend=backend, device=device, dtype=torch.float32, **options)


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


def test_concurrent_requests_equal_running_alone(eager):
    eng = Engine(eager, max_num_seqs=2, max_num_batched_tokens=12, block_size=4)
    assert eng.decode_path.startswith("contiguous") and "eager backend" in eng.decode_path
    assert _run(eng, _prompts()) == _alone(eager, _prompts())
    assert eng.preemptions == 0 and eng.calls["paged_decode"] == 0


# MLA latent, GQA k/v, V3.2's latent + indexer key caches (sparse MLA over the indexer's top-k)
@pytest.mark.parametrize("preset", ["deepseek-v2-lite-tiny", "r1-distill-qwen-tiny", "deepseek-v3.2-tiny"])
def test_paged_decode_equals_running_alone_under_preemption(preset):
    """Triton: every decode token of a step in one block-table call (up to three requests of different lengths,
    three padded to bucket 4), chunked prefill beside it, and 6 blocks for 9 blocks' worth of requests
    (preemption)."""
    exe = _exe("triton", preset)
    prompts, maxes = [_prompts()[i] for i in (4, 2, 0)], (4, 5, 4)   # the interpreter is slow: 5, 9, 3 tokens
    eng = Engine(exe, max_num_seqs=3, max_num_batched_tokens=12, block_size=4, num_blocks=6)
    assert eng.decode_path.startswith("paged") and "capture disabled" in eng.decode_path
    assert _run(eng, prompts, maxes) == _alone(exe, prompts, maxes)
    assert eng.preemptions > 0 and eng.calls["paged_decode"] > 0
    assert eng.paged.stats["padded_rows"] > 0 and eng.paged.stats["graph_replays"] == 0
    assert all(exe.compiled._run.consts[k] is t for k, t in eng.paged.program.consts.items())   # weights shared


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paged_decode_replays_cuda_graphs_with_the_same_outputs():
    """On a GPU the paged decode steps replay one CUDA graph per batch bucket; tokens equal the uncaptured run's
    (decode_graphs=False) and each request's own `generate`."""
    prompts, maxes = _prompts(), MAXES
    runs = {}
    for graphs in (True, False):
        exe = _exe("triton", device="cuda", decode_graphs=graphs)
        eng = Engine(exe, max_num_seqs=4, max_num_batched_tokens=24, block_size=4)
        runs[graphs] = (_run(eng, prompts, maxes), dict(eng.paged.stats))
    (graphed, stats), (plain, plain_stats) = runs[True], runs[False]
    assert graphed == plain == _alone(exe, prompts, maxes)
    assert stats["graph_replays"] == stats["steps"] > 0 and 0 < stats["captures"] <= 3   # buckets 1, 2, 4
    assert plain_stats["graph_replays"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_v4_engine_on_cuda_equals_running_alone():
    """V4 on a GPU through the engine's contiguous path (its compact caches kept per request, the states in
    slots) gives each request's own `generate`."""
    prompts = [[t % 128 for t in p] for p in _prompts(3)]
    exe = _exe("triton", "deepseek-v4-tiny", device="cuda")
    eng = Engine(exe, max_num_seqs=4, max_num_batched_tokens=24, block_size=4)
    assert eng.decode_path.startswith("contiguous")
    assert _run(eng, prompts) == _alone(exe, prompts)
    assert eng.calls["contiguous"] > 0 and not eng.compact.held


def test_preemption_by_recompute_keeps_outputs(eager):
    prompts = _prompts(1)
    eng = Engine(eager, max_num_seqs=6, max_num_batched_tokens=64, block_size=4, num_blocks=13)
    assert _run(eng, prompts) == _alone(eager, prompts)
    assert eng.preemptions > 0


def test_v4_state_caches_kept_per_request_equal_running_alone():
    """V4's sliding-window and compressor states are fixed-size: each request keeps its own slot beside its
    blocks, through chunked prefill and preemption (which gives it up); no prefix caching (a hit would skip the
    tokens they summarise), so a repeated prompt is prefilled again."""
    exe = _exe("eager", "deepseek-v4-tiny")
    prompts = [[t % exe.vocab_size for t in p] for p in _prompts(1)]
    prompts, maxes = prompts + prompts[3:4], MAXES + (5,)
    eng = Engine(exe, max_num_seqs=6, max_num_batched_tokens=16, block_size=4, num_blocks=13)
    assert eng.decode_path.startswith("contiguous") and not eng.prefix_caching
    assert _run(eng, prompts, maxes) == _alone(exe, prompts, maxes)
    assert eng.preemptions > 0 and eng.pool.hits == 0
    assert sorted(eng.slots.free) == list(range(6)) and not eng.compact.held   # slots and entries given back


def test_v4_on_triton_keeps_compact_entries_per_request_equal_running_alone():
    """Triton on V4 (sliding, CSA, HCA layers): the paged program declines its compact compressed caches ([B, T//m,
    D]: an entry count per request's token count fits no block of token rows), so the engine runs the contiguous
    path, each request's entries kept beside its state slot; three requests of different lengths, whose decode
    steps close compressor groups and slide past the window, give each request's own greedy tokens (eager's: the
    interpreter is slow; preemption with state slots is the eager test's)."""
    def v4(backend):
        model = dsgraph.models.build_model("deepseek-v4-tiny", mtp=False, overrides={"num_hidden_layers": 3})
        return dsgraph.compile(model, backend=backend, device="cpu", dtype=torch.float32)
    exe = v4("triton")
    prompts = [[t % exe.vocab_size for t in _prompts(2)[i]] for i in (4, 0, 2)]
    prompts, maxes = [prompts[0] + prompts[1][:1], prompts[1], prompts[2]], (3, 5, 2)   # 6, 3, 9 tokens
    eng = Engine(exe, max_num_seqs=3, max_num_batched_tokens=12, block_size=4)
    assert eng.decode_path.startswith("contiguous") and eng.paged is None
    assert any("cache.1.cmp float32[B, T//4, 32] is compact" in n for n in exe.compiled.report.notes)
    assert _run(eng, prompts, maxes) == _alone(v4("eager"), prompts, maxes)
    assert eng.calls["contiguous"] > 0 and eng.calls["paged_decode"] == 0
    assert sorted(eng.slots.free) == list(range(3)) and not eng.compact.held   # slots and entries given back


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
