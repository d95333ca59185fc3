"""`dsgraph serve` driven by the official openai client: completions and chat, streamed deltas concatenating to
the non-streamed text, concurrent requests each equal to their own `generate`, n and seeds, usage counts,
/metrics, aborts on disconnect, and every error as OpenAI's JSON with its status."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import hf_fixtures as fx
import pytest
import torch

import dsgraph
from dsgraph.serve.engine import Engine, RequestOutput

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from dsgraph.serve.http import _coalesce, create_app  # noqa: E402  (needs the serve extra)

_one_thread = pytest.fixture(scope="module", autouse=True)(fx.one_thread)
NAME = "tiny"
PROMPTS = ["Hello", "the model and the", "a", "DeepSeek is a compiler of many words"]


class Server:
    """create_app on uvicorn in a thread of this process, on a free port."""

    def __init__(self, engine, **kw):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.engine = engine
        self.app = create_app(engine, NAME, **kw)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def exe():
    return dsgraph.compile(dsgraph.load("deepseek-v2-lite-tiny"), backend="eager", device="cpu",
                           dtype=torch.float32)


@pytest.fixture(scope="module")
def server(exe):
    s = Server(Engine(exe, max_num_seqs=4, max_num_batched_tokens=32, block_size=4), max_waiting=64)
    yield s
    s.stop()


def _alone(exe, prompt, n):
    return exe.generate(prompt, n, stop_token_ids=exe.tokenizer.eos_token_ids)


def test_completions_equal_generate_streamed_or_not(server, exe):
    c = server.client()
    for prompt in PROMPTS[:2]:
        ref = _alone(exe, prompt, 6)
        r = c.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0)
        assert r.choices[0].text == ref.text
        assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[ref.finish_reason]
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)
        chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == ref.text
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings_end_with_stop(server, exe):
    full = _alone(exe, "Hello", 8).text
    stop = full[3:5]
    ref = exe.generate("Hello", 8, stop=[stop], stop_token_ids=exe.tokenizer.eos_token_ids)
    r = server.client().completions.create(model=NAME, prompt="Hello", max_tokens=8, temperature=0, stop=stop)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (ref.text, "stop") and stop not in ref.text


def test_chat_uses_the_template_and_streams(server, exe):
    c = server.client()
    msgs = [{"role": "user", "content": "Hi there"}]
    ref = _alone(exe, msgs, 5)
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == ref.completion_tokens


def test_concurrent_requests_each_equal_their_own_generate(server, exe):
    c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    jobs = [(PROMPTS[i % 4], 2 + i % 5) for i in range(12)]

    async def go():
        return await asyncio.gather(*(c.completions.create(model=NAME, prompt=p, max_tokens=k, temperature=0)
                                      for p, k in jobs))
    outs = asyncio.run(go())
    for (p, k), r in zip(jobs, outs):
        assert r.choices[0].text == _alone(exe, p, k).text


def test_preemption_under_a_tiny_block_budget_changes_no_output(exe):
    s = Server(Engine(exe, max_num_seqs=8, block_size=4, num_blocks=14))
    c = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)

    async def go():
        # 24 tokens each (up to 8 of the 14 blocks): a few overlapping requests outgrow the pool, however their
        # arrivals spread out (8 tokens each sometimes finished before the next arrived)
        return await asyncio.gather(*(c.completions.create(model=NAME, prompt=p, max_tokens=24, temperature=0)
                                      for p in PROMPTS * 2))
    try:
        outs = asyncio.run(go())
        assert s.engine.preemptions > 0 and s.engine.pool.used == 0
        assert [r.choices[0].text for r in outs] == [_alone(exe, p, 24).text for p in PROMPTS * 2]
    finally:
        s.stop()


def test_n_and_seed_and_id_prompts(server, exe):
    c = server.client()
    r = c.completions.create(model=NAME, prompt=["Hello", "a"], max_tokens=4, temperature=0.9, seed=3, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    again = c.completions.create(model=NAME, prompt=["Hello", "a"], max_tokens=4, temperature=0.9, seed=3, n=2)
    assert [ch.text for ch in r.choices] == [ch.text for ch in again.choices]
    ref = exe.generate(["Hello", "a"], 4, temperature=0.9, top_p=1.0, top_k=0, seed=3, n=2,
                       stop_token_ids=exe.tokenizer.eos_token_ids)
    assert [ch.text for ch in r.choices] == [o.text for o in ref]
    ids = exe.tokenizer.encode("Hello")
    r = c.completions.create(model=NAME, prompt=ids, max_tokens=4, temperature=0)
    assert r.choices[0].text == _alone(exe, "Hello", 4).text


def test_logprobs_are_the_models(server, exe):
    c = server.client()
    ids = exe.tokenizer.encode("Hello")
    want = torch.log_softmax(exe([ids])[0, -1].float(), -1)
    r = c.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert abs(lp.token_logprobs[0] - float(want.max())) < 1e-4
    assert len(lp.top_logprobs[0]) == 3 and abs(max(lp.top_logprobs[0].values()) - lp.token_logprobs[0]) < 1e-6
    msgs = [{"role": "user", "content": "Hi"}]
    chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=3, temperature=0, stream=True,
                                            logprobs=True, top_logprobs=2))
    items = [i for ch in chunks if ch.choices and ch.choices[0].logprobs for i in ch.choices[0].logprobs.content]
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=3, temperature=0, logprobs=True,
                                  top_logprobs=2)
    assert [i.logprob for i in items] == [i.logprob for i in r.choices[0].logprobs.content]
    assert all(len(i.top_logprobs) == 2 for i in items) and len(items) == r.usage.completion_tokens


def test_errors_are_openai_json(server, exe):
    c = server.client()
    for kw, param in [({"max_tokens": -1}, "max_tokens"), ({"temperature": 5}, "temperature"),
                      ({"prompt": [10 ** 6]}, "prompt"), ({"max_tokens": 10 ** 4}, "prompt"),
                      ({"n": 0}, "n"), ({"logprobs": 9}, "logprobs"), ({"suffix": "x"}, "suffix")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(**{"model": NAME, "prompt": "Hello", **kw})
        assert e.value.body["param"] == param and e.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="other", prompt="Hello")
    r = httpx.post(server.url + "/v1/completions", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert [m.id for m in c.models.list()] == [NAME]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_disconnect_aborts_and_metrics_show_it(server):
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"model": NAME, "prompt": "Hello", "max_tokens": 200, "stream": True}) as r:
        next(r.iter_lines())
    for _ in range(200):
        if not server.engine.has_unfinished():
            break
        time.sleep(0.05)
    assert server.engine.pool.used == 0 and not server.engine.has_unfinished()
    text = httpx.get(server.url + "/metrics").text
    assert 'dsgraph_requests_total{finish_reason="abort"}' in text and "dsgraph_kv_blocks_used 0.0" in text
    assert "dsgraph_time_to_first_token_seconds_count" in text


def test_queue_full_and_api_key(exe):
    s = Server(Engine(exe, max_num_seqs=1), max_waiting=1, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client().completions.create(model=NAME, prompt="Hello", max_tokens=2)
        with pytest.raises(openai.RateLimitError) as e:
            s.client(api_key="sekret").completions.create(model=NAME, prompt="Hello", max_tokens=2, n=2)
        assert e.value.response.headers["retry-after"] == "1"
        r = s.client(api_key="sekret").completions.create(model=NAME, prompt="Hello", max_tokens=2)
        assert r.usage.completion_tokens >= 1
    finally:
        s.stop()


def test_bounded_load_loses_and_duplicates_nothing(exe):
    s = Server(Engine(exe, max_num_seqs=16, max_num_batched_tokens=64, block_size=4), max_waiting=256)
    c = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
    gate = asyncio.Semaphore(32)

    async def one(i):
        async with gate:
            return await c.completions.create(model=NAME, prompt=PROMPTS[i % 4], max_tokens=1 + i % 3,
                                              temperature=0)

    async def go():
        return await asyncio.gather(*(one(i) for i in range(96)))
    try:
        t0 = time.perf_counter()
        outs = asyncio.run(go())
        assert time.perf_counter() - t0 < 60
        assert len({r.id for r in outs}) == 96 and s.engine.pool.used == 0
        want = {(p, k): _alone(exe, p, k).text for p in PROMPTS for k in (1, 2, 3)}
        assert all(r.choices[0].text == want[PROMPTS[i % 4], 1 + i % 3] for i, r in enumerate(outs))
    finally:
        s.stop()


def test_cli_serves_and_exits_0_on_sigterm(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dsgraph", "serve", "deepseek-v2-lite-tiny", "--port", str(port),
                             "--served-model-name", NAME, "--max-num-seqs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert r.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_benchmark_script_counts_every_token(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "benchmarks/serve.py", "deepseek-v2-lite-tiny", "--device", "cpu",
                          "--concurrency", "1,4", "--prompts", "4", "--input-len", "8", "--output-len", "3",
                          "--client-procs", "0"],
                         cwd=root, env={**os.environ, "PYTHONPATH": str(root), "OUT": str(tmp_path)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "serve.json").read_text())["results"]
    assert [r["concurrency"] for r in rows] == [1, 4] and all(r["output_tokens"] == 12 for r in rows)


def test_waiting_stream_outputs_merge_into_one_chunk_each():
    """A stream's outputs queued together become one per request (tokens, text and logprobs joined, the last
    one's finish), and an error among them ends the batch after what came before it."""
    a1 = RequestOutput("a", [5], "x", False, logprobs=[(-1.0, {})])
    b1 = RequestOutput("b", [7], "y", False)
    a2 = RequestOutput("a", [6], "z", True, "length", logprobs=[(-2.0, {})])
    outs, err = _coalesce([a1, b1, a2, RuntimeError("boom"), RequestOutput("b", [8], "w", True)])
    assert [(o.request_id, o.new_token_ids, o.new_text, o.finished, o.finish_reason) for o in outs] == \
        [("a", [5, 6], "xz", True, "length"), ("b", [7], "y", False, None)]
    assert outs[0].logprobs == [(-1.0, {}), (-2.0, {})] and outs[1].logprobs is None and str(err) == "boom"
