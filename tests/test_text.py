"""dsgraph.text against transformers (the oracle): encode/decode, chat templates, streaming detokenisation and
stop strings, on a DeepSeek-style byte-level BPE trained in the fixture (tests/text_fixtures.py)."""
from __future__ import annotations

import random

import pytest
import text_fixtures as tf

from dsgraph.errors import TokenizerError
from dsgraph.text import GenerationConfig, IncrementalDetokenizer, TextStream, load_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tf.write_tokenizer(d, generation={"eos_token_id": [1, 5]})
    return d


@pytest.fixture(scope="module")
def pair(tok_dir):
    from transformers import AutoTokenizer  # the oracle (dev dependency)
    return load_tokenizer(tok_dir), AutoTokenizer.from_pretrained(tok_dir)


def test_encode_decode_match_transformers(pair):
    ours, hf = pair
    assert ours.vocab_size == len(hf)
    for s in tf.STRINGS:
        for special in (True, False):
            ids = hf.encode(s, add_special_tokens=special)
            assert ours.encode(s, add_special_tokens=special) == ids, s
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), s


def test_added_tokens_from_config_and_named_specials(pair):
    ours, hf = pair
    assert ours.encode("<think>x</think>") == hf.encode("<think>x</think>")
    assert ours.bos_token_id == hf.bos_token_id and ours.token_id("eos_token") == hf.eos_token_id
    assert ours.eos_token_ids == [1, 5]          # generation_config's list wins over the tokenizer's eos
    assert ours.decode(ours.encode("<think>a"), skip_special_tokens=True) == "<think>a"   # not special: kept


CHATS = [
    [{"role": "user", "content": "hi 🙂"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "naïve 日本語?"},
     {"role": "assistant", "content": "ok"}, {"role": "system", "content": "again"},
     {"role": "user", "content": "more"}],
    [{"role": "user", "content": "call it"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get", "arguments": {"q": "café <b>&", "n": [1, 2]}}}]}],
]


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_matches_transformers(pair, chat):
    ours, hf = pair
    for gen in (False, True):
        for kw in ({}, {"with_date": True}):
            text = hf.apply_chat_template(CHATS[chat], add_generation_prompt=gen, tokenize=False, **kw)
            assert ours.apply_chat_template(CHATS[chat], add_generation_prompt=gen, tokenize=False, **kw) == text
            assert ours.apply_chat_template(CHATS[chat], add_generation_prompt=gen, **kw) == \
                hf.encode(text, add_special_tokens=False)


def test_chat_template_raise_exception_and_errors(pair, tmp_path):
    ours, _ = pair
    with pytest.raises(TokenizerError, match="Unknown role: robot"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(TokenizerError, match="list of dicts"):
        ours.apply_chat_template("hello")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizers library"):
        load_tokenizer(tmp_path)


def _random_ids(tok, rng, n):
    text = " ".join(rng.choice(tf.STRINGS) for _ in range(3))
    ids = tok.encode(text)[:n]
    return ids + [rng.randrange(tok.vocab_size) for _ in range(4)]   # random bytes: broken characters too


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_joins_to_decode(pair, skip):
    ours, _ = pair
    rng = random.Random(0)
    for _ in range(40):
        ids = _random_ids(ours, rng, rng.randint(1, 40))
        d = IncrementalDetokenizer(ours, skip_special_tokens=skip)
        pieces = [d.push(i) for i in ids]
        assert all("\ufffd" not in p for p in pieces if "\ufffd" not in ours.decode(ids, skip_special_tokens=skip))
        assert "".join(pieces) + d.flush() == ours.decode(ids, skip_special_tokens=skip)


def test_emoji_split_across_tokens_is_never_half_emitted(pair):
    ours, _ = pair
    ids = ours.encode("🇫🇷👍🏽", add_special_tokens=False)
    assert len(ids) > 2   # the emoji bytes span several tokens
    d = IncrementalDetokenizer(ours)
    pieces = [d.push(i) for i in ids]
    assert "".join(pieces) == "🇫🇷👍🏽" and all("\ufffd" not in p for p in pieces)
    assert "" in pieces   # some tokens held back until their character was complete


@pytest.mark.parametrize("stop,expect", [(["brown fox"], "the quick "), (["zzz"], "the quick brown fox jumps"),
                                         (["k b", "fox"], "the quic"), (["s", "ps"], "the quick brown fox jum")])
def test_stop_strings_across_token_boundaries(pair, stop, expect):
    ours, _ = pair
    ids = ours.encode("the quick brown fox jumps", add_special_tokens=False)
    stream = TextStream(ours, stop=stop)
    shown = ""
    for i in ids:
        shown += stream.push(i)
        assert not any(s in shown for s in stop)
        if stream.stopped_on:
            break
    shown += stream.finish()
    assert shown == stream.text == expect
    assert (stream.stopped_on is None) == (stop == ["zzz"])


def test_generation_config(tok_dir):
    cfg = GenerationConfig.from_dir(tok_dir)
    assert cfg.do_sample and cfg.temperature == 0.6 and cfg.top_p == 0.95 and cfg.eos_token_id == [1, 5]
    assert GenerationConfig.from_dict({"eos_token_id": 7}).eos_token_id == [7]
    with pytest.raises(TokenizerError, match="eos_token_id"):
        GenerationConfig.from_dict({"eos_token_id": "x"})
