"""A DeepSeek-style tokenizer written into a checkpoint directory, for the text tests: a byte-level BPE trained
here with `tokenizers` on a few KB of mixed-script text, DeepSeek's special tokens (fullwidth bars, `▁`), a
post-processor that adds the bos, `<think>`/`</think>` as added non-special tokens, and a chat template in
DeepSeek-V3's shape (system prompts gathered first, user/assistant markers, tool calls through `tojson`,
`raise_exception` on an unknown role, `strftime_now`)."""
from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
TOOLS_BEGIN, TOOLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
SPECIAL = [BOS, EOS, USER, ASSISTANT, TOOLS_BEGIN, TOOLS_END]
THINK = ["<think>", "</think>"]

CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{{ bos_token }}{% if with_date is defined and with_date %}Today is {{ strftime_now('%Y-%m-%d') }}. {% endif %}"
    "{{ ns.system_prompt }}\n"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}\n"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<｜Assistant｜><｜tool▁calls▁begin｜>' }}"
    "{%- for tc in message['tool_calls'] %}{{ tc['function']['name'] }}{{ tc['function']['arguments'] | tojson }}"
    "{%- endfor %}{{ '<｜tool▁calls▁end｜>' + eos_token }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{%- elif message['role'] != 'system' %}{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")

WORDS = ("the model compiles graphs into kernels and every pass is proven against the eager interpreter while "
         "DeepSeek uses multi-head latent attention with mixture of experts routing over 256 experts "
         "naïve café résumé Größe déjà vu straße año über 日本語 中文 한국어 русский язык ελληνικά עברית "
         "emoji 🙂 🚀 👍🏽 🇫🇷 ❤️ ∑ ∫ π ≈ 3.14159 fn main() { return 0; } x = [1, 2, 3]  tabs\tand\nnew lines").split(" ")


def corpus(n_lines: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(n_lines)]


def train_tokenizer(vocab_size: int = 420) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                      special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def _added(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def write_tokenizer(path: Path, generation: dict | None = None, vocab_size: int = 420) -> Tokenizer:
    """tokenizer.json, tokenizer_config.json and generation_config.json in `path`; returns the trained
    tokenizer (the `<think>` tokens are declared only in tokenizer_config.json, as some checkpoints do)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    tok.save(str(path / "tokenizer.json"))
    n = tok.get_vocab_size()
    decoder = {str(tok.token_to_id(t)): _added(t, True) for t in SPECIAL}
    decoder.update({str(n + i): _added(t, False) for i, t in enumerate(THINK)})
    config = {"add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "bos_token": {"__type": "AddedToken", **_added(BOS, True)}, "eos_token": EOS, "pad_token": EOS,
              "legacy": True, "model_max_length": 16384, "tokenizer_class": "PreTrainedTokenizerFast",
              "added_tokens_decoder": decoder, "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    gen = {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS), "do_sample": True,
           "temperature": 0.6, "top_p": 0.95, **(generation or {})}
    (path / "generation_config.json").write_text(json.dumps(gen))
    return tok


# strings to round-trip: mixed scripts, emoji with modifiers and flags, specials inside text, whitespace runs
STRINGS = ["Hello world", "", " leading space", "trailing space ", "naïve café 日本語", "emoji 🙂🚀👍🏽🇫🇷❤️",
           "tabs\tand\nnew\n\nlines", f"{BOS}inside{EOS} text", "<think>reasoning</think> answer",
           "unseen: ☃ ﷺ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero-width", "x = [1, 2, 3]; fn main() { return 0; }", "   ", "ü" * 7,
           *corpus(20, seed=7)]
