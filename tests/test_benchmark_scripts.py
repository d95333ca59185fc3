"""The benchmark scripts run (small shapes, CPU): their checks and their output stay true."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_mtp_speedup_controls_acceptance(tmp_path):
    """Speculative output is checked equal to plain greedy inside the script; acceptance follows the corruption."""
    run("benchmarks/mtp_speedup.py", "--device", "cpu", "--backend", "eager", "--tiny", "--layers", "2", "--dense",
        "1", "--experts", "8", "--dtype", "float32", "--new-tokens", "10", "--prompts", "2", "--wrong", "1.0,0.0",
        env={"OUT": str(tmp_path)})
    rows = json.loads((tmp_path / "mtp_speedup.json").read_text())["results"]
    assert rows[0]["acceptance"] < 0.1 and rows[1]["acceptance"] == 1.0
    assert rows[1]["tokens_per_step"] > 1.5


def test_pipeline_time_runs_every_default_pass():
    out = run("benchmarks/pipeline_time.py", "deepseek-v3-tiny", "--backend", "triton")
    assert "absorb_mla=" in out and "group_moe=" in out


def test_profile_decode_charges_every_step_and_restores_the_program():
    """The GPU profiler script's plumbing, on the CPU: one range per lowered step, the program left as it was."""
    import torch
    from dsgraph.backends.triton.decode_graphs import DecodeGraphs

    import dsgraph
    from benchmarks.profile_decode import node_times
    from dsgraph.app.bench.workloads import random_inputs
    model = dsgraph.load("deepseek-v2-lite-tiny")
    exe = dsgraph.compile(model, backend="triton", device="cpu")
    graphed = DecodeGraphs(exe.compiled._run, dict(exe.graph.cache_map), None, capture=False)
    graphed(random_inputs(exe.graph, {"B": 1, "S": 1, "T": 5}, 0, model.config.vocab_size), 5)
    program = graphed.program
    fns = [s.fn for s in program.steps]
    with torch.no_grad():
        per_node, kernels = node_times(graphed.buffers[(1, None)], program, steps=1)
    assert set(per_node) == {s.label for s in program.steps}
    assert [s.fn for s in program.steps] == fns and not kernels  # no device kernels on the CPU


def test_count_launches_sees_the_fused_mla_rows():
    """The CPU launch counter: fuse_mla_rows takes four launches per layer out of a decode step (the query's bmm +
    RoPE become one kernel; RMSNorm + RoPE + concat of the cache row one kernel that writes the cache itself)."""
    from dsgraph.backends import get_backend

    from benchmarks.count_launches import count
    pipeline = get_backend("triton").default_pipeline()
    fused, layers = count("deepseek-v2-lite-tiny", pipeline, {}, 4)
    plain, _ = count("deepseek-v2-lite-tiny", [p for p in pipeline if p != "fuse_mla_rows"], {}, 4)
    assert sum(plain.values()) - sum(fused.values()) == 4 * layers
    assert fused["mla.latent_row+cache.append"] == fused["mla.query_absorbed"] == layers


def test_profile_decode_names_a_malformed_option():
    """--option takes KEY=INT; anything else stops before the (large) model loads, with the expected form."""
    out = subprocess.run([sys.executable, "benchmarks/profile_decode.py", "--option", "gemv"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--option takes KEY=INT, e.g. gemv=0" in out.stderr


def test_dsa_gpu_rows_check_their_kernels(tmp_path):
    """The V3.2 kernel benchmark at toy sizes on the interpreter: every row checked against its op reference."""
    run("benchmarks/dsa_gpu.py", "--tiny", "--device", "cpu", env={"OUT": str(tmp_path), "TRITON_INTERPRET": "1"})
    rows = json.loads((tmp_path / "dsa_gpu.json").read_text())["results"]
    assert [r["kernel"] for r in rows] == ["sparse_mla", "indexer_logits", "sparse_mla_fp8", "indexer_fp8", "topk",
                                           "dense_mla"]
    assert all("error" not in r and r["rel_err"] < 1e-4 for r in rows), rows


def test_vl_benchmark_times_the_encoder_and_first_token(tmp_path):
    """The multimodal script on CPU: a hybrid tower (two pixel inputs), Janus and VL2 (a tiled image), floors from
    the towers' GEMMs."""
    names = ["deepseek-vl-hybrid-tiny", "janus-tiny", "deepseek-vl2-small-tiny"]
    run("benchmarks/vl_gpu.py", "--device", "cpu", "--dtype", "float32", "--presets", ",".join(names),
        "--backends", "eager", "--reps", "1", env={"OUT": str(tmp_path)})
    rows = json.loads((tmp_path / "vl_gpu.json").read_text())["results"]
    assert [r["preset"] for r in rows] == names
    assert all(r["encoder_floor_s"] > 0 and r["ttft_s"] > 0 for r in rows)
