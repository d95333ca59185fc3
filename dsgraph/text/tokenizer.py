"""The checkpoint's tokenizer as the hub ships it: tokenizer.json (run by the `tokenizers` library, the engine
transformers' fast tokenizers use), tokenizer_config.json (chat template, named special tokens, extra added
tokens, the add_bos/eos switches) and generation_config.json (sampling defaults, EOS ids).

    tok = load_tokenizer(path)
    ids = tok.encode("Hello")                  # with the bos the checkpoint's post-processor adds
    text = tok.decode(ids, skip_special_tokens=True)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from dsgraph.errors import TokenizerError

from .chat import render_chat_template
from .config import FILE as GENERATION_FILE
from .config import GenerationConfig

TEMPLATE_FILE = "chat_template.jinja"   # where newer transformers saves the template
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", TEMPLATE_FILE, GENERATION_FILE)
NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' clean_up_tokenization: spaces before punctuation and English contractions dropped
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _content(tok) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken dict with `content`."""
    return tok.get("content") if isinstance(tok, dict) else tok


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); re-download the checkpoint's tokenizer files") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data


class Tokenizer:
    """encode / decode / apply_chat_template with transformers' semantics, without transformers."""

    def __init__(self, backend: Backend, config: dict | None = None, generation: GenerationConfig | None = None,
                 files: dict[str, Path | str] | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self.generation = generation or GenerationConfig()
        self.files = dict(files or {})      # file name -> source path (or the text itself), saved into artifacts
        self._add_config_tokens()
        self.special_tokens = {k: _content(self.config[k]) for k in NAMED if _content(self.config.get(k))}
        self.chat_template = self.config.get("chat_template")
        self.clean_up_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def _add_config_tokens(self) -> None:
        """Tokens tokenizer_config.json declares (added_tokens_decoder, the named specials) that tokenizer.json
        lacks are added, as transformers does on load."""
        decl = self.config.get("added_tokens_decoder") or {}
        missing = [t for t in decl.values() if isinstance(t, dict) and self.backend.token_to_id(t["content"]) is None]
        for t in missing:
            tok = AddedToken(t["content"], single_word=t.get("single_word", False), lstrip=t.get("lstrip", False),
                             rstrip=t.get("rstrip", False), normalized=t.get("normalized", False),
                             special=t.get("special", True))
            (self.backend.add_special_tokens if t.get("special", True) else self.backend.add_tokens)([tok])
        named = [_content(self.config.get(k)) for k in NAMED]
        new = [AddedToken(t, special=True, normalized=False) for t in named
               if t and self.backend.token_to_id(t) is None]
        if new:
            self.backend.add_special_tokens(new)

    # ids of the named tokens ------------------------------------------------------------------------------
    def token_id(self, name: str) -> int | None:
        tok = self.special_tokens.get(name)
        return self.backend.token_to_id(tok) if tok is not None else None

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """The stop ids: generation_config's (one or several), else the tokenizer's eos token."""
        if self.generation.eos_token_id:
            return list(self.generation.eos_token_id)
        eos = self.token_id("eos_token")
        return [eos] if eos is not None else []

    # text <-> ids -------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            for a, b in _CLEANUP:
                text = text.replace(a, b)
        return text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True,
                            **kwargs):
        """The conversation rendered with the checkpoint's template: token ids (tokenized without adding special
        tokens again: the template writes its own bos) or, with tokenize=False, the text."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template (tokenizer_config.json); give a plain prompt "
                                 "instead of chat messages")
        template = self.chat_template
        if isinstance(template, list):   # a list of named templates: the "default" one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        text = render_chat_template(template, messages, add_generation_prompt, self.special_tokens, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, directory) -> list[str]:
        """Write the source files into `directory` (copies, byte for byte); returns their names."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, src in self.files.items():
            if isinstance(src, str):
                (directory / name).write_text(src, encoding="utf-8")
            else:
                shutil.copyfile(src, directory / name)
        return sorted(self.files)


def has_tokenizer(path) -> bool:
    return (Path(path) / "tokenizer.json").is_file()


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a checkpoint (or artifact) directory; tokenizer.json is required, the two configs are
    optional."""
    root = Path(path)
    tj = root / "tokenizer.json"
    if not tj.is_file():
        raise TokenizerError(f"{root} has no tokenizer.json: copy the checkpoint's tokenizer files there, or give "
                             "token ids (--prompt-ids) instead of text")
    try:
        backend = Backend.from_file(str(tj))
    except Exception as e:  # the tokenizers library raises bare Exceptions on malformed files
        raise TokenizerError(f"{tj} could not be read by the tokenizers library ({e}); re-download it") from None
    cfg_file = root / "tokenizer_config.json"
    config = _read_json(cfg_file) if cfg_file.is_file() else {}
    if (root / TEMPLATE_FILE).is_file():
        config["chat_template"] = (root / TEMPLATE_FILE).read_text(encoding="utf-8")
    files = {name: root / name for name in TOKENIZER_FILES if (root / name).is_file()}
    return Tokenizer(backend, config, GenerationConfig.from_dir(root), files)
