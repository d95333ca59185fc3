"""Text generation against transformers: a tiny Llama-shape checkpoint with the fixture's DeepSeek-style
tokenizer; greedy text equals transformers' generate + decode (EOS from generation_config.json), stop strings,
seeds, ragged batches, and the sampling distribution against transformers' logits processors."""
from __future__ import annotations

import json

import dsgraph.models as models
import hf_fixtures as fx
import pytest
import text_fixtures as tf
import torch

import dsgraph
from dsgraph.errors import InputError, TokenizerError
from dsgraph.runtime.sampling import SamplingParams, distribution, seen_mask

PROMPTS = ["Hello world", "naïve café 日本語 and the model", "🙂"]
NEW = 12
_one_thread = pytest.fixture(scope="module", autouse=True)(fx.one_thread)


class Checkpoint:
    """The checkpoint dir, transformers' model and tokenizer, and an EOS id the greedy run meets mid-way."""

    def __init__(self, path):
        from transformers import AutoTokenizer, LlamaConfig  # the oracle (dev dependency)
        self.path = path
        tok = tf.write_tokenizer(path)
        cfg = LlamaConfig(**{**fx._LLAMA, "vocab_size": tok.get_vocab_size() + len(tf.THINK)},
                          num_key_value_heads=2)
        self.hf = fx.hf_model(cfg, seed=5)
        self.hf.save_pretrained(path)
        tf.write_tokenizer(path)     # save_pretrained wrote its own generation_config.json
        self.hf_tok = AutoTokenizer.from_pretrained(path)
        ids = torch.tensor([self.hf_tok.encode(PROMPTS[0])])
        free = self.hf.generate(ids, max_new_tokens=NEW, do_sample=False)[0, ids.shape[1]:].tolist()
        self.eos = next(t for k, t in enumerate(free) if k >= 4 and t not in free[:k])
        gen = json.loads((path / "generation_config.json").read_text())
        (path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [1, self.eos]}))

    def hf_text(self, prompt: str, new: int = NEW) -> tuple[list[int], str]:
        ids = torch.tensor([self.hf_tok.encode(prompt)])
        out = self.hf.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=[1, self.eos],
                               pad_token_id=1)[0, ids.shape[1]:].tolist()
        return out, self.hf_tok.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return Checkpoint(tmp_path_factory.mktemp("textckpt"))


@pytest.fixture(scope="module")
def exe(ckpt):
    return dsgraph.compile(dsgraph.load(str(ckpt.path)), backend="eager")


def test_greedy_text_matches_transformers(ckpt, exe):
    for prompt in PROMPTS:
        ids, text = ckpt.hf_text(prompt)
        out = exe.generate(prompt, max_new_tokens=NEW, temperature=0)
        assert out.token_ids == ids and out.text == text, prompt
        assert out.finish_reason == ("eos" if ids[-1] == ckpt.eos else "length")
        assert out.prompt_tokens == len(ckpt.hf_tok.encode(prompt)) and out.completion_tokens == len(ids)
    assert exe.generate(PROMPTS[0], max_new_tokens=NEW, temperature=0).finish_reason == "eos"


def test_chat_prompt_uses_the_template(ckpt, exe):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids = torch.tensor([ckpt.hf_tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]])
    assert exe.model.apply_chat_template(chat) == ids[0].tolist()
    want = ckpt.hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=[1, ckpt.eos],
                            pad_token_id=1)[0, ids.shape[1]:].tolist()
    assert exe.generate(chat, max_new_tokens=6, temperature=0).token_ids == want


def test_ragged_batch_equals_single_runs(exe):
    outs = exe.generate(PROMPTS, max_new_tokens=6, temperature=0, stop_token_ids=[])
    assert [o.token_ids for o in outs] == [exe.generate(p, max_new_tokens=6, temperature=0,
                                                        stop_token_ids=[]).token_ids for p in PROMPTS]


@pytest.mark.parametrize("backend", ["eager", "triton", "tvm"])
def test_ragged_ids_run_as_one_batch_on_every_backend(backend, monkeypatch):
    from dsgraph.backends import available_backends
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} backend unavailable here")
    exe = dsgraph.compile(models.build_model("deepseek-v3-tiny", seed=4), backend=backend)
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    alone = [exe.generate(torch.tensor([r]), max_new_tokens=4)[0].tolist() for r in rows]
    shapes, step = [], exe.step
    monkeypatch.setattr(exe, "step", lambda ids, *a, **k: shapes.append(tuple(ids.shape)) or step(ids, *a, **k))
    assert exe.generate(rows, max_new_tokens=4).tolist() == alone
    assert [s for s in shapes if s[1] > 1] == [(3, 2)]   # one batch: the shortest length prefilled, tails fed after


def test_stop_string_across_token_boundaries(exe):
    free = exe.generate(PROMPTS[1], max_new_tokens=NEW, temperature=0, stop_token_ids=[])
    toks = [exe.tokenizer.decode([t], skip_special_tokens=True) for t in free.token_ids]
    whole = [bool(t) and "\ufffd" not in t for t in toks]     # tokens that decode to whole characters
    k = next(i for i in range(1, len(toks)) if whole[i - 1] and whole[i])
    stop = toks[k - 1][-1] + toks[k][0]                         # the last char of one token + the next's first
    start = free.text.find(stop)
    out = exe.generate(PROMPTS[1], max_new_tokens=NEW, temperature=0, stop=[stop], stop_token_ids=[])
    assert out.finish_reason == "stop" and out.stop == stop and out.text == free.text[:start]


def test_seeded_sampling_is_reproducible_and_batch_independent(exe):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, stop_token_ids=[])
    a = exe.generate(PROMPTS[0], seed=1, **kw)
    assert exe.generate(PROMPTS[0], seed=1, **kw).token_ids == a.token_ids
    assert exe.generate(PROMPTS, seed=1, **kw)[0].token_ids == a.token_ids
    runs = exe.generate(PROMPTS[0], seed=2, n=4, **kw)
    assert len(runs) == 4 and len({tuple(r.token_ids) for r in runs + [a]}) > 1
    big = exe.generate(PROMPTS[0], seed=-2 ** 70, **kw)          # any int is a seed
    assert exe.generate(PROMPTS[0], seed=-2 ** 70, **kw).token_ids == big.token_ids
    tiny_t = exe.generate(PROMPTS[0], seed=3, max_new_tokens=8, temperature=1e-4, stop_token_ids=[])
    assert tiny_t.token_ids == exe.generate(PROMPTS[0], max_new_tokens=8, temperature=0, stop_token_ids=[]).token_ids


def test_defaults_come_from_generation_config(exe):
    # the fixture ships do_sample with temperature 0.6 / top_p 0.95: unseeded calls differ, seeded repeat
    kw = dict(max_new_tokens=8, stop_token_ids=[], seed=4)
    assert exe.generate(PROMPTS[0], **kw).token_ids == exe.generate(PROMPTS[0], **kw).token_ids
    assert exe.generate(PROMPTS[0], **kw).token_ids != \
        exe.generate(PROMPTS[0], max_new_tokens=8, stop_token_ids=[], temperature=0).token_ids


def test_bad_options_are_named(exe):
    with pytest.raises(InputError, match="top_p"):
        exe.generate("hi", top_p=1.5)
    with pytest.raises(InputError, match="unknown generate option"):
        exe.generate("hi", temprature=0.5)
    with pytest.raises(InputError, match="stop strings need a text prompt"):
        exe.generate([[1, 2]], stop=["x"])


@pytest.mark.parametrize("params", [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
                                    dict(temperature=1.0, min_p=0.2), dict(temperature=0.9, repetition_penalty=1.3,
                                                                           top_k=50, top_p=0.9)])
def test_distribution_matches_transformers_processors(params):
    from transformers.generation import logits_process as lp  # the oracle
    g = torch.Generator().manual_seed(0)
    logits, history = torch.randn(3, 97, generator=g) * 3, torch.randint(0, 97, (3, 6), generator=g)
    seen = seen_mask(history, 97)
    chain = [lp.RepetitionPenaltyLogitsProcessor(params.get("repetition_penalty", 1.0)),
             lp.TemperatureLogitsWarper(params["temperature"])]
    chain += [lp.TopKLogitsWarper(params["top_k"])] if "top_k" in params else []
    chain += [lp.TopPLogitsWarper(params["top_p"])] if "top_p" in params else []
    chain += [lp.MinPLogitsWarper(params["min_p"])] if "min_p" in params else []
    want = logits.clone()
    for proc in chain:
        want = proc(history, want)
    got = distribution(logits, SamplingParams(**params), seen)
    torch.testing.assert_close(got, torch.softmax(want, -1), atol=1e-6, rtol=1e-5)


def test_finished_rows_leave_the_batch(exe, monkeypatch):
    rows = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    alone = [exe.generate(torch.tensor([r]), max_new_tokens=6)[0].tolist() for r in rows]
    eos = alone[0][2]                                  # row 0 stops at its third token
    sizes, step = [], exe.step
    monkeypatch.setattr(exe, "step", lambda tok, *a, **k: sizes.append(tok.shape[0]) or step(tok, *a, **k))
    out = exe.generate(rows, max_new_tokens=6, stop_token_ids=[eos])
    for r, a in zip(out, alone):
        assert r == a[:a.index(eos) + 1] if eos in a else r == a
    assert sizes[0] == 3 and sizes[-1] < 3


def test_text_prompt_errors_are_named(exe):
    bare = dsgraph.compile(models.build_model("deepseek-llm-tiny", overrides={"vocab_size": 300}), backend="eager")
    with pytest.raises(TokenizerError, match="has no tokenizer"):
        bare.generate("hi")
    bare.tokenizer = exe.tokenizer               # 422 ids against a 300-token model
    text = exe.tokenizer.decode([410, 411])
    with pytest.raises(InputError, match="encoded prompt holds token id"):
        bare.generate(text)


def test_max_time_ends_with_length(exe):
    out = exe.generate(PROMPTS[0], max_new_tokens=50, max_time=0.0, temperature=0, stop_token_ids=[])
    assert out.finish_reason == "length" and out.completion_tokens == 1
    full = exe.generate(PROMPTS[0], max_new_tokens=3, max_time=60.0, temperature=0, stop_token_ids=[])
    assert full.completion_tokens == 3 and full.time_to_first_token_s > 0 and full.decode_tokens_per_s > 0


def test_repetition_penalty_matches_transformers(ckpt, exe):
    ids = torch.tensor([ckpt.hf_tok.encode(PROMPTS[1])])
    want = ckpt.hf.generate(ids, max_new_tokens=8, do_sample=False, repetition_penalty=0.3, eos_token_id=None,
                            pad_token_id=1)[0, ids.shape[1]:].tolist()
    got = exe.generate(PROMPTS[1], max_new_tokens=8, temperature=0, repetition_penalty=0.3, stop_token_ids=[])
    assert got.token_ids == want
    assert want != exe.generate(PROMPTS[1], max_new_tokens=8, temperature=0, stop_token_ids=[]).token_ids
