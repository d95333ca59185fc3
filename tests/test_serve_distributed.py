"""`torchrun -m dsgraph serve --tp 2 --ep 2` (and, slow, `--ep 2 --dp-attention`) on two gloo ranks: rank 0
serves, rank 1 steps with it; concurrent completions (greedy, seeded sampling, a chat) equal one process's
answers, an unseeded sampled request (its seed drawn on rank 0) keeps the ranks in step, rank 1 prints nothing,
and SIGTERM to rank 0 ends both ranks with exit 0."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dsgraph

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

MODEL, NAME = "deepseek-v3-tiny", "tiny"
GREEDY = [("Hello", 6), ("the model and the", 3), ("a", 5), ("DeepSeek is a compiler of many words", 4)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank0(torchrun_pid: int) -> int:
    """The pid of torchrun's worker with RANK=0."""
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == torchrun_pid and b"\0RANK=0\0" in b"\0" + (entry / "environ").read_bytes():
                return int(entry.name)
        except (ValueError, OSError, IndexError):
            continue
    raise AssertionError("no rank 0 worker under torchrun")


def _wait_healthy(url: str, proc) -> None:
    for _ in range(1200):
        assert proc.poll() is None, "the server exited while starting"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("the server did not start")


@pytest.mark.parametrize("plan", [["--tp", "2", "--ep", "2"],
                                  pytest.param(["--ep", "2", "--dp-attention"], marks=pytest.mark.slow)])
def test_two_ranks_serve_what_one_process_serves_and_stop_on_sigterm(tmp_path, plan):
    port, log = _free_port(), open(tmp_path / "server.log", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "dsgraph", "serve", MODEL, *plan, "--device", "cpu",
                             "--port", str(port), "--served-model-name", NAME, "--max-num-seqs", "4",
                             "--max-num-batched-tokens", "16", "--block-size", "4"],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        exe = dsgraph.compile(dsgraph.load(MODEL))
        eos = exe.tokenizer.eos_token_ids
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        async def go():
            greedy = [c.completions.create(model=NAME, prompt=p, max_tokens=k, temperature=0) for p, k in GREEDY]
            sampled = c.completions.create(model=NAME, prompt=["Hello", "a"], max_tokens=5, temperature=0.9,
                                           seed=3, n=2)
            chat = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                             temperature=0)
            unseeded = c.completions.create(model=NAME, prompt="the", max_tokens=6, temperature=1.0)
            return await asyncio.gather(*greedy, sampled, chat, unseeded)
        *greedy, sampled, chat, unseeded = asyncio.run(go())
        for (p, k), r in zip(GREEDY, greedy):
            assert r.choices[0].text == exe.generate(p, k, stop_token_ids=eos).text
        ref = exe.generate(["Hello", "a"], 5, temperature=0.9, top_p=1.0, top_k=0, seed=3, n=2, stop_token_ids=eos)
        assert [ch.text for ch in sampled.choices] == [o.text for o in ref]
        msgs = [{"role": "user", "content": "Hi"}]
        assert chat.choices[0].message.content == exe.generate(msgs, 4, stop_token_ids=eos).text
        assert unseeded.usage.completion_tokens >= 1
        assert httpx.get(url + "/health").json()["running"] == 0     # rank 1 kept up: no divergence, no hang

        os.kill(_rank0(proc.pid), signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    out = log.read()
    assert out.count("serving tiny") == 1 and out.count("rank 0 of 2 holds") == 1 and "rank 1 of 2" not in out, out
