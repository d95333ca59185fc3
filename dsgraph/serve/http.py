"""The OpenAI-compatible HTTP server over an Engine: /v1/completions, /v1/chat/completions (streamed as
server-sent events in OpenAI's chunk format, ending `data: [DONE]`), /v1/models, /health, /metrics.

Every choice (a prompt times `n`) is one engine request; sample j of a prompt is seeded (seed, j), as
`generate` seeds it. A client that disconnects mid-stream aborts its requests (their blocks are freed). Errors
are OpenAI's JSON: 400 naming the field, 401 without the API key, 404 for another model, 429 when the queue is
full (with Retry-After). Needs the `serve` extra (fastapi, uvicorn, prometheus-client).
"""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dsgraph.errors import DSGraphError

from . import protocol as proto
from .protocol import APIError
from .runner import Metrics, Runner


def create_app(engine, model_name: str, api_key: str | None = None, max_waiting: int = 256,
               shutdown_timeout: float = 10.0) -> FastAPI:
    """A FastAPI app serving `engine` under the name `model_name`; the engine thread runs with the app."""
    runner = Runner(engine, Metrics())
    handlers = _Handlers(engine, runner, model_name, max_waiting)

    @asynccontextmanager
    async def lifespan(_):
        runner.start()
        yield
        await asyncio.to_thread(runner.shutdown, shutdown_timeout)

    app = FastAPI(title="dsgraph serve", lifespan=lifespan)
    app.state.runner = runner

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    if api_key:
        app.add_middleware(_BearerAuth, api_key=api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/metrics")
    async def metrics():
        runner.metrics.observe_engine(engine)
        return Response(generate_latest(runner.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "dsgraph", "max_model_len": engine.exe.max_positions}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handlers.serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handlers.serve(request, chat=True)

    app.add_api_route("/", lambda: PlainTextResponse("dsgraph serve: OpenAI-compatible API under /v1\n"))
    return app


class _BearerAuth:
    """401 for a /v1 request without `Authorization: Bearer <api_key>`. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware (`@app.middleware`) relays every chunk of a streamed response through a task and a memory
    stream of its own, a cost per token per client."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and \
                dict(scope["headers"]).get(b"authorization") != self.expected:
            e = APIError(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key")
            await JSONResponse(e.body(), status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _drain(queue: asyncio.Queue) -> list:
    """The next item of `queue` and every item already behind it."""
    items = [await queue.get()]
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _coalesce(items: list) -> tuple[list, Exception | None]:
    """A request's outputs waiting together merged into one (its tokens, text and logprobs joined; the last one's
    finish), in the order the requests first appear; and the first exception among them (what follows it is
    dropped). When the client reads slower than the engine steps, a stream then sends one chunk per read, not
    one per step."""
    merged: dict[str, object] = {}
    for o in items:
        if isinstance(o, Exception):
            return list(merged.values()), o
        prev = merged.get(o.request_id)
        merged[o.request_id] = o if prev is None else replace(
            o, new_token_ids=prev.new_token_ids + o.new_token_ids, new_text=prev.new_text + o.new_text,
            logprobs=None if o.logprobs is None else (prev.logprobs or []) + o.logprobs)
    return list(merged.values()), None


class _Handlers:
    """The completion endpoints: a request body to engine requests, their outputs to a response or a stream."""

    def __init__(self, engine, runner: Runner, model_name: str, max_waiting: int):
        self.engine, self.runner, self.model_name, self.max_waiting = engine, runner, model_name, max_waiting

    async def serve(self, request: Request, chat: bool):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        job = proto.parse(body, chat, self.model_name)
        if self.engine.num_waiting + len(job.prompts) * job.n > self.max_waiting:
            raise APIError(429, f"the queue is full ({self.engine.num_waiting} requests waiting); retry later",
                           code="queue_full", headers={"Retry-After": "1"})
        queue: asyncio.Queue = asyncio.Queue()
        index = self._submit(job, queue)
        if job.stream:
            return StreamingResponse(self._events(job, queue, index), media_type="text/event-stream")
        try:
            finals = await self._collect(queue, index)
        finally:
            for rid in index:
                self.runner.abort(rid)          # a no-op for finished requests; frees a cancelled one's blocks
        tok = self.engine.exe.tokenizer
        choices = [proto.choice(job, index[rid], text, o.finish_reason,
                                logprobs=proto.logprobs(job, tok, o.token_ids, lps)) for rid, (text, o, lps) in
                   finals.items()]
        choices.sort(key=lambda c: c["index"])
        return proto.envelope(job, self.model_name, choices, use=self._usage(job, finals.values()))

    def _submit(self, job, queue) -> dict[str, int]:
        """Every choice queued; {request id: choice index}. A bad prompt aborts those already queued."""
        index: dict[str, int] = {}
        try:
            for i, prompt in enumerate(job.prompts):
                for j in range(job.n):
                    index[self.runner.submit(prompt, queue, j, job.options)] = i * job.n + j
        except DSGraphError as e:
            for rid in index:
                self.runner.abort(rid)
            raise APIError(400, str(e), "messages" if job.chat else "prompt") from None
        return index

    @staticmethod
    def _usage(job, finals) -> dict:
        """Prompt tokens once per prompt (its n samples share it), completion tokens of every choice."""
        finals = [f[1] for f in finals]
        return proto.usage(sum(o.prompt_tokens for o in finals) // job.n, sum(o.completion_tokens for o in finals))

    @staticmethod
    async def _collect(queue, index) -> dict:
        """{request id: (its text, its final RequestOutput, its logprob entries or None)}."""
        texts, lps, finals = {rid: [] for rid in index}, {rid: [] for rid in index}, {}
        while len(finals) < len(index):
            o = await queue.get()
            if isinstance(o, Exception):
                raise APIError(500, f"generation failed: {o}")
            texts[o.request_id].append(o.new_text)
            lps[o.request_id] += o.logprobs or []
            if o.finished:
                finals[o.request_id] = ("".join(texts[o.request_id]), o,
                                        None if o.logprobs is None else lps[o.request_id])
        return finals

    async def _events(self, job, queue, index):
        """The SSE stream of one request: a chunk per text delta, finish reasons, usage if asked, [DONE]."""
        pending, finals = set(index), {}
        sse = lambda doc: f"data: {json.dumps(doc)}\n\n"
        try:
            if job.chat:    # the first delta of every choice names the role
                yield sse(proto.envelope(job, self.model_name, [proto.choice(job, i, "", None, True, True)
                                                                for i in sorted(index.values())], chunk=True))
            while pending:
                outs, error = _coalesce(await _drain(queue))
                events = []
                for o in outs:
                    if o.new_text or o.finished:
                        lp = proto.logprobs(job, self.engine.exe.tokenizer, o.new_token_ids, o.logprobs)
                        c = proto.choice(job, index[o.request_id], o.new_text,
                                         o.finish_reason if o.finished else None, delta=True, logprobs=lp)
                        events.append(sse(proto.envelope(job, self.model_name, [c], chunk=True)))
                    if o.finished:
                        pending.discard(o.request_id)
                        finals[o.request_id] = ("", o, None)
                if error is not None:
                    events.append(sse(APIError(500, f"generation failed: {error}").body()))
                if events:
                    yield "".join(events)     # one write for everything that was waiting
                if error is not None:
                    break
            if job.include_usage and not pending:
                yield sse(proto.envelope(job, self.model_name, [], chunk=True, use=self._usage(job, finals.values())))
            yield "data: [DONE]\n\n"
        finally:            # a disconnected client cancels this generator: its requests leave the engine
            for rid in pending:
                self.runner.abort(rid)
