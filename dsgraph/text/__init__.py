"""Text in, text out: the checkpoint's tokenizer, its chat template, generation config and streaming
detokenisation. Below the runtime (which generates from text) and above the core; imports only the core's errors.

    tok = load_tokenizer("/path/to/DeepSeek-V3")        # tokenizer.json + tokenizer_config.json
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
"""
from __future__ import annotations

from .chat import render_chat_template  # noqa: F401
from .config import GenerationConfig  # noqa: F401
from .stream import IncrementalDetokenizer, TextStream  # noqa: F401
from .tokenizer import TOKENIZER_FILES, Tokenizer, has_tokenizer, load_tokenizer  # noqa: F401
