"""`torchrun -m dsgraph serve --tp 2 --ep 2` (and, slow, `--ep 2 --dp-attention`) on two gloo ranks: rank 0
serves, rank 1 steps with it; concurrent completions (greedy, seeded sampling, a chat) equal one process's
answers, an unseeded sampled request (its seed drawn on rank 0) keeps the ranks in step, rank 1 prints nothing,
and SIGTERM to rank 0 ends both ranks with exit 0."""
from __future__ import annotations

import asyncio
import json
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


WORKER = """
import json, sys, time
import dsgraph
from dsgraph.errors import RankDivergence
from dsgraph.parallel import ParallelPlan
from dsgraph.runtime import distributed
from dsgraph.serve.engine import Engine
from dsgraph.serve.lockstep import LockstepEngine
rank, _ = distributed.init("cpu")
exe = dsgraph.compile(dsgraph.load(%(model)r), parallel=ParallelPlan(tp=2))
eng = LockstepEngine(exe, max_num_seqs=2, max_num_batched_tokens=8, block_size=4, heartbeat_s=0.2)
odd = LockstepEngine(exe, heartbeat_s=0.2)
if rank == 0:
    eng.start_heartbeat()
    greedy = eng.generate([[5, 17, 3, 99]], 4)[0].token_ids
    time.sleep(1.0)                                    # idle: heartbeats only
    rid = eng.add_request([1, 2, 3], 8, temperature=0.8)    # its seed is drawn here
    eng.step()
    eng.abort(rid)
    sampled = eng.generate([[9, 8, 7]], 3, temperature=0.8, seed=5, stop_token_ids=[])[0].token_ids
    eng.close()
    odd.start_heartbeat()
    time.sleep(1.0)
    odd.close()
    json.dump({"greedy": greedy, "sampled": sampled}, open(sys.argv[1], "w"))
else:
    eng.follow()
    Engine.enqueue(odd, odd.new_request([1, 2], 2))   # a request rank 0 never sent
    try:
        odd.follow()
    except RankDivergence as e:
        print("diverged:", e, flush=True)
    Engine.abort(odd, "req-0")
    odd.follow()
"""


def test_lockstep_engine_heartbeats_and_refuses_divergence(tmp_path):
    """The Python API on two gloo ranks: outputs equal one process's around idle heartbeats and an unseeded
    sampled request; a follower holding a request rank 0 does not stops with RankDivergence at the next message."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER % {"model": MODEL})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, exe = json.loads((tmp_path / "out.json").read_text()), dsgraph.compile(dsgraph.load(MODEL))
    assert got["greedy"] == exe.generate([[5, 17, 3, 99]], max_new_tokens=4)[0].tolist()
    ref = exe.generate([[9, 8, 7]], 3, temperature=0.8, seed=5, stop_token_ids=[])
    assert got["sampled"] == ref[0].tolist()
    assert proc.stdout.count("diverged: rank 1's engine differs from rank 0's") == 1, proc.stdout
