"""The NCCL path on one GPU: `torchrun --nproc-per-node 1` joins a one-rank NCCL group, a tiny preset compiled
with a ParallelPlan through the triton backend generates the single-process greedy tokens with its decode steps
replayed from CUDA graphs, and collectives (`dist.all_reduce`, `dist.all_gather` through NCCL) captured inside a
CUDA graph replay the eager values; the lockstep serve engine on that group pages its decode through CUDA graphs.

Run on the device machine: SKIP_MOE=1 TESTS=tests/test_distributed_gpu.py bash benchmarks/run_gpu.sh check"""
import json
import os
import subprocess
import sys

import pytest
import torch

import dsgraph

MODEL, PROMPT, NEW = "deepseek-v3-tiny", [5, 17, 3, 99], 8
WORKER = """
import json, sys
import torch
import torch.distributed as tdist
import dsgraph
from dsgraph.backends import get_backend
from dsgraph.parallel import ParallelPlan
from dsgraph.runtime import distributed

rank, world = distributed.init("cuda")
out = {"world": world, "backend": tdist.get_backend()}
exe = dsgraph.compile(dsgraph.load(%(model)r), backend="triton", device="cuda", parallel=ParallelPlan())
out["plan"] = exe.graph.meta["shard"]["plan"]
out["tokens"] = exe.generate([%(prompt)r], max_new_tokens=%(new)d)[0].tolist()
out["stats"] = dict(exe.compiled.decode_step.stats)
out["disabled"] = exe.compiled.decode_step.disabled

calls = []
for name in ("all_reduce", "all_gather"):
    real = getattr(tdist, name)
    setattr(tdist, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
b = dsgraph.GraphBuilder("collectives")
x = b.input("x", (4, 8), "float32")
y = b.op("dist.all_reduce", b.op("mul", x, x), group_size=1)
b.output("y", b.op("dist.all_gather", y, group_size=1, dim=0))
graph = b.build()
compiled = get_backend("triton").compile(graph, {}, device="cuda")
static = torch.randn(4, 8, device="cuda")
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    compiled.run({"x": static})
torch.cuda.current_stream().wait_stream(side)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    captured = compiled.run({"x": static})
fresh = torch.randn(4, 8, device="cuda")
static.copy_(fresh)
g.replay()
torch.cuda.synchronize()
out["collective_calls"] = calls
out["replay_matches"] = bool(torch.allclose(captured["y"], fresh * fresh))
json.dump(out, open(sys.argv[1], "w"))
"""


def _torchrun_one(tmp_path, source: str) -> dict:
    """`source` (a worker writing JSON to argv[1]) under torchrun with one rank, on CUDA; what it wrote."""
    script, result = tmp_path / "worker.py", tmp_path / "result.json"
    script.write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           str(script), str(result)], capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(result.read_text())
    return got


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nccl_world_of_one_runs_sharded_decode_in_cuda_graphs_gpu(tmp_path):
    got = _torchrun_one(tmp_path, WORKER % {"model": MODEL, "prompt": PROMPT, "new": NEW})
    assert got["world"] == 1 and got["backend"] == "nccl"
    assert got["plan"] == {"tp": 1, "ep": 1, "dp_attention": False}
    single = dsgraph.compile(dsgraph.load(MODEL), backend="triton", device="cuda")
    assert got["tokens"] == single.generate([PROMPT], max_new_tokens=NEW)[0].tolist()
    assert got["disabled"] is None, got["disabled"]
    assert got["stats"]["graph_steps"] > 0 and got["stats"]["captures"] > 0, got["stats"]
    # the collectives went through NCCL (warm-up and capture: twice each) and the replay recomputed them
    assert got["collective_calls"].count("all_reduce") == 2 and got["collective_calls"].count("all_gather") == 2
    assert got["replay_matches"]


SERVE_WORKER = """
import json, sys
import dsgraph
from dsgraph.parallel import ParallelPlan
from dsgraph.runtime import distributed
from dsgraph.serve.lockstep import LockstepEngine
distributed.init("cuda")
exe = dsgraph.compile(dsgraph.load(%(model)r), backend="triton", device="cuda", parallel=ParallelPlan())
eng = LockstepEngine(exe, max_num_seqs=4, max_num_batched_tokens=16, block_size=4)
outs = eng.generate(%(prompts)r, %(new)d)
eng.close()
json.dump({"tokens": [o.token_ids for o in outs], "path": eng.decode_path, "calls": eng.calls,
           "stats": dict(eng.paged.stats) if eng.paged is not None else None}, open(sys.argv[1], "w"))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lockstep_serve_engine_on_nccl_pages_decode_in_cuda_graphs_gpu(tmp_path):
    """`dsgraph serve --tp/--ep`'s engine (serve/lockstep.py: its control messages over a gloo group beside NCCL)
    on a one-rank NCCL group: the sharded graph's paged decode replays CUDA graphs and every request's tokens equal
    its own generate."""
    prompts = [PROMPT, [7, 1, 2, 3, 4, 5, 6, 8, 9], [11, 12]]
    got = _torchrun_one(tmp_path, SERVE_WORKER % {"model": MODEL, "prompts": prompts, "new": NEW})
    single = dsgraph.compile(dsgraph.load(MODEL), backend="triton", device="cuda")
    assert got["tokens"] == [single.generate([p], max_new_tokens=NEW)[0].tolist() for p in prompts]
    assert got["calls"]["paged_decode"] > 0, got["path"]
    assert got["stats"]["graph_replays"] > 0, got["stats"]
