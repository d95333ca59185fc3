"""The OpenAI wire format: request bodies checked field by field (an error names the field, as OpenAI's do) and
the response and stream-chunk shapes of /v1/completions and /v1/chat/completions."""
from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}
MAX_N = 16


class APIError(Exception):
    """An error the client sees as OpenAI's {"error": {...}} body with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}
        return {"error": {"message": self.message, "type": kind.get(self.status, "invalid_request_error")
                          if self.status < 500 else "server_error", "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One HTTP request: its prompts (text, token ids or one chat), samples per prompt and engine options."""

    chat: bool
    prompts: list
    n: int
    stream: bool
    include_usage: bool
    options: dict = field(default_factory=dict)
    id: str = ""
    created: int = 0


def _bad(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}", param)


def _number(body: dict, key: str, lo: float, hi: float, integer: bool = False):
    v = body.get(key)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise _bad(key, f"must be {kind} in [{lo}, {hi}], got {v!r}")
    return v


def _ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _prompts(body: dict) -> list:
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if _ids(p):
        return [p]
    if isinstance(p, list) and p and (all(isinstance(s, str) for s in p) or all(_ids(r) for r in p)):
        return list(p)
    raise _bad("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists")


def _messages(body: dict) -> list:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):     # content parts: the text ones, joined
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise _bad(f"messages[{i}]", "must be an object with a string role and string (or text-part) content")
        out.append({"role": m["role"], "content": content})
    return out


def parse(body, chat: bool, model_name: str) -> Job:
    """The checked Job of a request body, or the APIError naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                       "model_not_found")
    for key in ("tools", "suffix", "echo", "best_of"):
        if body.get(key) and not (key == "best_of" and body[key] == 1):
            raise _bad(key, "is not supported by dsgraph serve yet")
    prompts = [_messages(body)] if chat else _prompts(body)
    max_tokens = _number(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else
                         "max_tokens", 1, 1 << 30, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) and s for s in stop)):
        raise _bad("stop", "must be a string or a list of at most 4 non-empty strings")
    seed = _number(body, "seed", -(1 << 62), 1 << 62, integer=True)
    options = {"max_tokens": max_tokens if max_tokens is not None else (None if chat else 16),
               "temperature": _number(body, "temperature", 0, 2), "top_p": _number(body, "top_p", 1e-9, 1),
               "top_k": _number(body, "top_k", 0, 1 << 30, integer=True), "seed": seed, "stop": tuple(stop or ())}
    if not isinstance(body.get("ignore_eos", False), bool):
        raise _bad("ignore_eos", "must be a boolean")
    if body.get("ignore_eos"):      # an extension (as vLLM's): run to max_tokens, e.g. for benchmarks
        options["stop_token_ids"] = ()
    if chat:     # chat: logprobs a boolean, top_logprobs the alternatives; completions: logprobs the alternatives
        if not isinstance(body.get("logprobs", False), bool):
            raise _bad("logprobs", f"must be a boolean for chat completions, got {body['logprobs']!r}")
        top = _number(body, "top_logprobs", 0, 20, integer=True)
        options["logprobs"] = (top or 0) if body.get("logprobs") else None
        if top is not None and not body.get("logprobs"):
            raise _bad("top_logprobs", "needs logprobs: true")
    else:
        options["logprobs"] = _number(body, "logprobs", 0, 5, integer=True)
    if options["temperature"] is None:
        options["temperature"] = 1.0          # OpenAI's default (a server does not read generation_config)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", f"must be a boolean, got {stream!r}")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise _bad("stream_options", "must be an object")
    n = _number(body, "n", 1, MAX_N, integer=True) or 1
    kind = "chatcmpl" if chat else "cmpl"
    return Job(chat, prompts, n, stream, bool(so.get("include_usage")), {k: v for k, v in options.items()
                                                                          if v is not None or k == "max_tokens"},
               f"{kind}-{uuid.uuid4().hex}", int(time.time()))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(job: Job, index: int, text: str, finish: str | None, delta: bool = False, role: bool = False,
           logprobs: dict | None = None) -> dict:
    reason = FINISH.get(finish) if finish else None
    if not job.chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
    if delta:
        d = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
        return {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": reason}


def logprobs(job: Job, tokenizer, ids: list[int], entries, offset: int = 0) -> dict | None:
    """OpenAI's logprobs object for these tokens (chat: `content` items; completions: parallel lists)."""
    if entries is None:
        return None
    piece = lambda t: tokenizer.decode([t])
    if job.chat:
        item = lambda t, lp: {"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode())}
        return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in top.items()]}
                            for t, (lp, top) in zip(ids, entries)]}
    strs = [piece(t) for t in ids]
    return {"tokens": strs, "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [{piece(a): b for a, b in top.items()} for _, top in entries],
            "text_offset": list(itertools.accumulate((len(x) for x in strs), initial=offset))[:-1]}


def envelope(job: Job, model: str, choices: list, chunk: bool = False, use: dict | None = None) -> dict:
    obj = ("chat.completion" if job.chat else "text_completion") + (".chunk" if chunk and job.chat else "")
    out = {"id": job.id, "object": obj, "created": job.created, "model": model, "choices": choices}
    if use is not None or not chunk:
        out["usage"] = use
    return out
