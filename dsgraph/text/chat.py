"""Chat templates: the checkpoint's Jinja template rendered the way transformers' `apply_chat_template` renders
it, so a prompt built here is byte-for-byte the prompt the model was trained on.

What transformers' rendering does (and so what this does): a sandboxed environment (templates from the hub are
untrusted code) with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `{% generation %}` block
tag that renders its body, a `tojson` filter that does not HTML-escape (`json.dumps`, `ensure_ascii=False`),
`raise_exception(msg)`, `strftime_now(fmt)`, and the variables `messages`, `tools`, `documents`,
`add_generation_prompt` plus the named special tokens (`bos_token`, `eos_token`, ...) as strings.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dsgraph.errors import TokenizerError


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's part in training templates; rendering keeps
    its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template does not parse (line {e.lineno}: {e.message}); fix chat_template "
                             "in tokenizer_config.json") from None


def render_chat_template(source: str, messages: list[dict], add_generation_prompt: bool = False,
                         special_tokens: dict[str, str] | None = None, tools=None, documents=None, **kwargs) -> str:
    """The template rendered for one conversation. A template's `raise_exception` (a role it does not accept,
    a system message in the wrong place) becomes a TokenizerError with the template's own message."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise TokenizerError(f"messages must be a list of dicts like {{'role': 'user', 'content': '...'}}, "
                             f"got {type(messages).__name__}")
    variables = {**(special_tokens or {}), **kwargs}
    try:
        return compile_template(source).render(messages=[dict(m) for m in messages], tools=tools,
                                               documents=documents, add_generation_prompt=add_generation_prompt,
                                               **variables)
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"the chat template refused the messages: {e}") from None
