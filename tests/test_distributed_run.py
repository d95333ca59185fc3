"""Real multi-process runs: two and four ranks on gloo (torchrun --standalone, in a subprocess) whose logits and
greedy tokens equal the single-process run, through the Python API (eager, and triton's interpreter for one
plan; four ranks: TP groups of 2 inside EP 4, on torch.distributed subgroups) and through the CLI
(`torchrun -m dsgraph run --tp --ep`, token ids and text, printing on rank 0 only); a collective's one-process
reference (reduce_scatter, which no plan emits yet; on a subgroup with four ranks) equals its simulation."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import dsgraph
from dsgraph.app.cli import main
from dsgraph.numerics import rel_err, tolerance
from dsgraph.ops.dist import SIMULATE
from dsgraph.parallel import ParallelPlan

MODEL, PROMPT, NEW = "deepseek-v3-tiny", [5, 17, 3, 99], 4
PLANS = [("eager", ParallelPlan(tp=2, ep=2)), ("eager", ParallelPlan(ep=2, dp_attention=True)),
         ("triton", ParallelPlan(tp=2))]
PLANS4 = [("eager", ParallelPlan(tp=2, ep=4, dp_attention=True)), ("eager", ParallelPlan(tp=2, ep=4))]
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
b.output("y", b.op("dist.reduce_scatter", b.input("x", (4, 3), "float32"), group_size=%(group)d, dim=0))
x = torch.Generator().manual_seed(rank)
out["reduce_scatter"] = dsgraph.run(b.build(), {}, {"x": torch.randn(4, 3, generator=x)})["y"]
if rank == 0:
    save_file(out, sys.argv[1] + "/logits.safetensors")
    json.dump({"tokens": tokens, "world": world}, open(sys.argv[1] + "/tokens.json", "w"))
"""


def torchrun(*args, ranks=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(ranks), *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def single():
    return dsgraph.compile(dsgraph.load(MODEL))


def gloo_ranks_equal_one_process(tmp_path, single, plans, ranks, group):
    script = tmp_path / "worker.py"
    script.write_text(WORKER % {"model": MODEL, "prompt": PROMPT, "new": NEW, "group": group,
                                "plans": [(b, p.to_dict()) for b, p in plans]})
    proc = torchrun(str(script), str(tmp_path), ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits, got = load_file(str(tmp_path / "logits.safetensors")), json.loads((tmp_path / "tokens.json").read_text())
    assert got["world"] == ranks
    want = single(torch.tensor([PROMPT]))
    tokens = single.generate([PROMPT], max_new_tokens=NEW)[0].tolist()
    xs = [[torch.randn(4, 3, generator=torch.Generator().manual_seed(r))] for r in range(group)]
    simulated = SIMULATE["dist.reduce_scatter"](xs, {"dim": 0, "group_size": group})
    assert torch.allclose(logits["reduce_scatter"], simulated[0][0])  # rank 0's group: ranks 0 .. group-1
    for i, (backend, plan) in enumerate(plans):
        assert rel_err(logits[f"logits{i}"], want) <= tolerance("float32", "model"), (backend, plan)
        assert got["tokens"][str(i)] == tokens, (backend, plan)


def test_two_gloo_ranks_equal_one_process(tmp_path, single):
    gloo_ranks_equal_one_process(tmp_path, single, PLANS, ranks=2, group=2)


@pytest.mark.slow
def test_four_gloo_ranks_with_tp_subgroups_equal_one_process(tmp_path, single):
    gloo_ranks_equal_one_process(tmp_path, single, PLANS4, ranks=4, group=2)


def test_cli_under_torchrun_prints_the_one_process_tokens_on_rank_0(single):
    proc = torchrun("-m", "dsgraph", "run", MODEL, "--tp", "2", "--ep", "2", "--prompt-ids",
                    ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = single.generate([PROMPT], max_new_tokens=NEW)[0].tolist()
    assert proc.stdout.count("prompt:") == 1  # rank 0 only
    assert f"tokens: {' '.join(map(str, tokens))}\n" in proc.stdout
    assert "rank 0 of 2 holds" in proc.stdout


def test_cli_under_torchrun_prints_the_one_process_text_on_rank_0(capsys):
    args = ["run", MODEL, "--prompt", "Hello!", "--temperature", "0", "--max-new-tokens", str(NEW)]
    assert main(args) == 0
    text = capsys.readouterr().out
    proc = torchrun("-m", "dsgraph", *args, "--tp", "2", "--ep", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert text.strip() and proc.stdout == text  # rank 0's text alone: the notes and stats are on stderr
    assert proc.stderr.count("tokens] ttft") == 1 and "rank 0 of 2 holds" in proc.stderr
