"""The tokenizer of the `-tiny` presets: a real byte-level BPE (the `tokenizers` library, DeepSeek's special
tokens and a DeepSeek-style chat template) trained, deterministically, on the paragraph below, with exactly the
tiny presets' 256 ids. It lets the demo and the tests take text; a tiny model's random weights make its
continuations noise, but the path (template, encode, sample, stream, decode) is the one real checkpoints take.

The printable ASCII characters are its alphabet; anything else encodes as `<unk>` (256 ids cannot hold the
256 bytes and the special tokens too).
"""
from __future__ import annotations

import json
import string
from functools import lru_cache

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from dsgraph.text import Tokenizer

VOCAB = 256
BOS, EOS, UNK = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<unk>"
SPECIAL = [BOS, EOS, UNK, "<｜User｜>", "<｜Assistant｜>"]
TEMPLATE = (
    "{% set ns = namespace(system='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.system = ns.system + m['content'] %}{% endif %}{% endfor %}{{ bos_token }}{{ ns.system }}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}"
    "{% elif m['role'] != 'system' %}{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")
CORPUS = (
    "Hello! dsgraph compiles DeepSeek models: the graph of ops goes through passes that absorb the attention "
    "weights and group the experts, then a backend turns it into kernels. Every pass is checked against the "
    "eager interpreter, and every backend too. What is the capital of France? The capital of France is Paris. "
    "Write a poem about the sea. The sea is wide and the sky is blue; the wind is cold and the day is new. "
    "def main(): return 42  # a tiny function, 1 + 2 = 3, [x for x in range(10)]\n")


def _byte_chars() -> list[str]:
    """The byte-level alphabet's spelling of the printable ASCII characters (space is 'Ġ', newline 'Ċ')."""
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return sorted({level.pre_tokenize_str(ch)[0][0] for ch in string.printable})


@lru_cache(maxsize=1)
def tiny_tokenizer_files() -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json, as text (the same bytes every run)."""
    tok = Backend(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, initial_alphabet=_byte_chars(),
                                  show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    config = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "clean_up_tokenization_spaces": False,
              "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, ensure_ascii=False)}


def tiny_tokenizer() -> Tokenizer:
    files = tiny_tokenizer_files()
    return Tokenizer(Backend.from_str(files["tokenizer.json"]), json.loads(files["tokenizer_config.json"]),
                     files=dict(files))
