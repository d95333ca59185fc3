"""TVM on the GPU with modules built on a machine without one.

    python benchmarks/tvm_gpu.py build DIR          # here: nvcc builds sm_90 modules (needs TVM's compiler)
    python benchmarks/tvm_gpu.py run DIR            # on the GPU machine, with TVM's runtime only

`build` compiles, for every tiny preset and for two full-size DeepSeek-V2-Lite layers, the graph after the
tvm pass pipeline into DIR/<name>/ (module.so + program.json). `run` rebuilds the same graph (passes are
deterministic), draws the weights on the GPU, loads the module without lowering or building, checks
prefill and a cached decode step against eager on the GPU, and times the decode step.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import dsgraph.models as models
import torch
from dsgraph.backends import get_backend

FULL = "deepseek-v2-lite-2layers"


def model_for(name: str, device: str = "cpu", dtype: str = "float32"):
    if name == FULL:  # layer 0 dense, layer 1 MoE (64 experts)
        return models.build_model("deepseek-v2-lite", dtype=dtype, mtp=False, weights_device=device,
                                  overrides={"num_hidden_layers": 2})
    return models.build_model(name, seed=0, dtype=dtype, mtp=False, weights_device=device)


def pipeline_graph(model):
    import dsgraph.passes as passes
    return passes.run_pipeline(model.graph, model.weights, get_backend("tvm").default_pipeline())[:2]


def build(out: Path) -> None:
    from dsgraph.backends.tvm import export_module
    for name in list(models.TINY_PRESETS) + [FULL]:
        t0 = time.perf_counter()
        graph, _ = pipeline_graph(model_for(name))
        rep = export_module(graph, "cuda", out / name)
        print(f"built {name:<24} in {time.perf_counter() - t0:5.1f}s  {rep['notes'][-1]}", flush=True)


def run(out: Path) -> None:
    from dsgraph.backends.tvm import TVMBackend

    import dsgraph
    from dsgraph.app.check import rel_err
    from dsgraph.runtime.executable import Executable
    results = []
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        name = d.name
        dtype = "float32"
        model = model_for(name, "cuda", dtype)
        graph, weights = pipeline_graph(model)
        compiled = TVMBackend().load_compiled(d, graph, weights, "cuda", dtype)
        exe = Executable(model, graph, compiled, "cuda", dtype, weights=weights)
        ref = dsgraph.compile(model, backend="eager", device="cuda", dtype=dtype, passes="none")
        vocab = model.config.vocab_size
        prompt = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
        lg, st = exe.prefill(prompt)
        rl, rst = ref.prefill(prompt)
        nxt = rl[:, -1:].argmax(-1)
        dl, st = exe.decode(nxt, st)
        rdl, _ = ref.decode(nxt, rst)
        same = torch.equal(exe.generate(prompt, 8), ref.generate(prompt, 8))
        err = max(rel_err(lg.cpu(), rl.cpu()), rel_err(dl.cpu(), rdl.cpu()))

        def step(e=exe, s=st):
            e.decode(nxt, s)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 10 * 1e3
        t0 = time.perf_counter()
        for _ in range(10):
            ref.decode(nxt, rst)
        torch.cuda.synchronize()
        eager_ms = (time.perf_counter() - t0) / 10 * 1e3
        row = {"model": name, "rel_err": err, "greedy_tokens_match": same, "decode_ms_batch2": ms,
               "eager_decode_ms_batch2": eager_ms}
        results.append(row)
        print(f"{name:<24} rel err {err:.2e}  tokens {'match' if same else 'DIFFER'}  "
              f"decode(B=2) tvm {ms:7.2f} ms  eager {eager_ms:7.2f} ms", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "tvm_gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                                      "results": results}, indent=1))


if __name__ == "__main__":
    mode, directory = sys.argv[1], Path(sys.argv[2])
    build(directory) if mode == "build" else run(directory)
