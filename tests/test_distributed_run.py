"""Real multi-process runs: two ranks on gloo (torchrun --standalone, in a subprocess) whose logits and greedy
tokens equal the single-process run, through the Python API (eager, and triton's interpreter for one plan) and
through the CLI (`torchrun -m dsgraph run --tp --ep`, printing on rank 0 only); a collective's one-process
reference (reduce_scatter, which no plan emits yet) equals its simulation."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import dsgraph
from dsgraph.numerics import rel_err, tolerance
from dsgraph.ops.dist import SIMULATE
from dsgraph.parallel import ParallelPlan

MODEL, PROMPT, NEW = "deepseek-v3-tiny", [5, 17, 3, 99], 4
PLANS = [("eager", ParallelPlan(tp=2, ep=2)), ("eager", ParallelPlan(ep=2, dp_attention=True)),
         ("triton", ParallelPlan(tp=2))]
WORKER = """
import json, sys
import torch
from safetensors.torch import save_file
import dsgraph
from dsgraph.parallel import ParallelPlan
from dsgraph.runtime import distributed
rank, world = distributed.init("cpu")
out, tokens = {}, {}
model = dsgraph.load(%(model)r)
for i, (backend, plan) in enumerate(%(plans)r):
    exe = dsgraph.compile(model, backend=backend, parallel=ParallelPlan(**plan))
    out[f"logits{i}"] = exe(torch.tensor([%(prompt)r]))
    tokens[i] = exe.generate([%(prompt)r], max_new_tokens=%(new)d)[0].tolist()
b = dsgraph.GraphBuilder("rs")
b.output("y", b.op("dist.reduce_scatter", b.input("x", (4, 3), "float32"), group_size=world, dim=0))
x = torch.Generator().manual_seed(rank)
out["reduce_scatter"] = dsgraph.run(b.build(), {}, {"x": torch.randn(4, 3, generator=x)})["y"]
if rank == 0:
    save_file(out, sys.argv[1] + "/logits.safetensors")
    json.dump({"tokens": tokens, "world": world}, open(sys.argv[1] + "/tokens.json", "w"))
"""


def torchrun(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def single():
    return dsgraph.compile(dsgraph.load(MODEL))


def test_two_gloo_ranks_equal_one_process(tmp_path, single):
    script = tmp_path / "worker.py"
    script.write_text(WORKER % {"model": MODEL, "prompt": PROMPT, "new": NEW,
                                "plans": [(b, p.to_dict()) for b, p in PLANS]})
    proc = torchrun(str(script), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits, got = load_file(str(tmp_path / "logits.safetensors")), json.loads((tmp_path / "tokens.json").read_text())
    assert got["world"] == 2
    want = single(torch.tensor([PROMPT]))
    tokens = single.generate([PROMPT], max_new_tokens=NEW)[0].tolist()
    xs = [[torch.randn(4, 3, generator=torch.Generator().manual_seed(r))] for r in range(2)]
    simulated = SIMULATE["dist.reduce_scatter"](xs, {"dim": 0, "group_size": 2})
    assert torch.allclose(logits["reduce_scatter"], simulated[0][0])  # gloo: all-reduce, keep rank 0's piece
    for i, (backend, plan) in enumerate(PLANS):
        assert rel_err(logits[f"logits{i}"], want) <= tolerance("float32", "model"), (backend, plan)
        assert got["tokens"][str(i)] == tokens, (backend, plan)


def test_cli_under_torchrun_prints_the_one_process_tokens_on_rank_0(single):
    proc = torchrun("-m", "dsgraph", "run", MODEL, "--tp", "2", "--ep", "2", "--prompt-ids",
                    ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = single.generate([PROMPT], max_new_tokens=NEW)[0].tolist()
    assert proc.stdout.count("prompt:") == 1  # rank 0 only
    assert f"tokens: {' '.join(map(str, tokens))}\n" in proc.stdout
    assert "rank 0 of 2 holds" in proc.stdout
