"""Where a graphed decode step's time goes: the triton backend's one-token step, node by node, on a CUDA GPU.

    python benchmarks/profile_decode.py deepseek-v2-lite --batch 1,64 --context 4096     # JSON + table to $OUT
    python benchmarks/profile_decode.py deepseek-v2-lite --option gemv=0                  # a backend option off
    python benchmarks/profile_decode.py deepseek-v2-lite --fold-shared-experts            # shared experts grouped
    python benchmarks/profile_decode.py deepseek-v2-lite --no-pass fuse_mla_rows          # a pass left out

The CUDA graph replays the static-capacity program (`backends/triton/decode_graphs.py`). This script times the
replay with CUDA events, then runs the same program under torch.profiler: one table sums device time by kernel
name, another charges the kernels torch launches (cuBLAS, copies, cat) to the graph node of their step (Triton's
launches are not correlated with host ranges). "gaps" is replay time minus the sum of kernel time: what launch
latency and tails cost inside the graph.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from dsgraph.backends import get_backend  # noqa: E402

import dsgraph  # noqa: E402
from dsgraph.app.bench.workloads import random_inputs  # noqa: E402


def _ranged(fn, label):
    def run(args, sym):
        with torch.profiler.record_function(label):
            return fn(args, sym)
    return run


def replay_us(graph: torch.cuda.CUDAGraph, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return times


def node_times(bufs, program, steps: int) -> tuple[dict, dict]:
    """{step label: device µs per decode step} for kernels launched through torch (a Triton kernel's launch is
    not correlated with its host range), and {kernel name: [launches, device µs] per step} for every kernel,
    from `steps` profiled runs."""
    plain = [s.fn for s in program.steps]
    for s in program.steps:
        s.fn = _ranged(s.fn, f"step:{s.label}")
    on_cuda = program.device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * on_cuda
    try:
        bufs._run()
        sync()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                bufs._run()
            sync()
    finally:
        for s, fn in zip(program.steps, plain):
            s.fn = fn
    per_node: dict[str, float] = defaultdict(float)
    kernels: dict[str, list] = defaultdict(lambda: [0.0, 0.0])
    for ev in prof.events():  # host-side ranges carry their kernels' device time; count kernels on the device
        if ev.device_type == torch.autograd.DeviceType.CPU and ev.name.startswith("step:"):
            per_node[ev.name[5:]] += ev.device_time_total / steps
        elif ev.device_type == torch.autograd.DeviceType.CUDA and not ev.name.startswith("step:"):
            kernels[ev.name][0] += 1 / steps
            kernels[ev.name][1] += ev.time_range.elapsed_us() / steps
    return per_node, kernels


def profile(a, model, exe, graphed, batch: int) -> None:
    """Time the replay of one batch size's graph and charge kernel time to nodes; print and write JSON."""
    inputs = random_inputs(exe.graph, {"B": batch, "S": 1, "T": a.context}, 0, model.config.vocab_size, "cuda")
    with torch.no_grad():
        graphed(inputs, a.context)
        bufs = graphed.buffers[(batch, None)]
        times = replay_us(bufs.graph, a.replays)
        per_node, kernels = node_times(bufs, graphed.program, a.steps)
    replay = statistics.median(times)
    by_op = defaultdict(float)
    for label, us in per_node.items():
        by_op[label.split(" -> ")[0]] += us
    busy = sum(us for _, us in kernels.values())
    launches = sum(n for n, _ in kernels.values())
    print(f"{a.model} decode B={batch} T={a.context} {a.dtype} options {a.options}"
          f"{' fold_shared_experts' if a.fold_shared_experts else ''}"
          f"{''.join(f' without {n}' for n in a.no_pass)}: replay {replay:.1f} us median "
          f"({len(times)} replays), kernels {busy:.1f} us in {launches:.0f} launches, gaps {replay - busy:.1f} us")
    print(f"{'kernel':<60} {'launches':>8} {'us/step':>9} {'%':>6}")
    for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        print(f"{name[:60]:<60} {n:8.0f} {us:9.1f} {100 * us / replay:6.1f}")
    print(f"\ntorch-launched kernels by op\n{'op':<32} {'us/step':>9} {'%':>6}")
    for op, us in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f"{op:<32} {us:9.1f} {100 * us / replay:6.1f}")
    print("\nslowest torch-launched nodes:")
    for label, us in sorted(per_node.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {us:8.1f} us  {label}")
    out = Path(os.environ.get("OUT", "."))
    tag = "".join(f"-{k}{v}" for k, v in a.options.items()) + ("-fold" if a.fold_shared_experts else "") \
        + "".join(f"-no-{n}" for n in a.no_pass)
    (out / f"profile-decode-{a.model}-b{batch}{tag}.json").write_text(json.dumps({
        "model": a.model, "batch": batch, "context": a.context, "dtype": a.dtype, "options": a.options,
        "fold_shared_experts": a.fold_shared_experts, "passes_left_out": a.no_pass,
        "gpu": torch.cuda.get_device_name(), "commit": os.environ.get("DSGRAPH_GIT_COMMIT"),
        "replay_us": times, "kernel_us": busy, "launches_per_step": launches, "by_kernel": kernels,
        "by_op_us": by_op, "by_node_us": per_node}, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="deepseek-v2-lite")
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--steps", type=int, default=5, help="profiled runs of the step")
    p.add_argument("--option", action="append", default=[], metavar="KEY=INT",
                   help="a triton backend option, e.g. gemv=0 (repeatable); the JSON's name carries it")
    p.add_argument("--fold-shared-experts", action="store_true",
                   help="run group_moe(fold_shared_experts=True) in the triton pipeline: the shared experts become "
                        "grouped-GEMM experts every token picks")
    p.add_argument("--no-pass", action="append", default=[], metavar="NAME",
                   help="leave a pass out of the triton pipeline (repeatable), e.g. fuse_mla_rows: the JSON's name "
                        "carries it")
    a = p.parse_args(argv)
    try:
        a.options = {k: int(v) for k, v in (o.split("=", 1) for o in a.option)}
    except ValueError:
        p.error(f"--option takes KEY=INT, e.g. gemv=0; got {a.option}")
    model = dsgraph.load(a.model)
    fold = {"fold_shared_experts": a.fold_shared_experts}
    pipeline = [s for s in get_backend("triton").default_pipeline(group_moe=fold)
                if (s[0] if isinstance(s, tuple) else s) not in a.no_pass]
    exe = dsgraph.compile(model, backend="triton", device="cuda", dtype=a.dtype, passes=pipeline, **a.options)
    graphed = exe.compiled.decode_step
    if graphed is None:
        raise SystemExit(f"{a.model}: no decode CUDA graphs ({exe.compiled.report.notes})")
    for batch in (int(b) for b in a.batch.split(",")):
        profile(a, model, exe, graphed, batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
