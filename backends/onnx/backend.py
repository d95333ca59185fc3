"""The `onnx` backend: export the graph (export.py) and run it with ONNX Runtime.

CPU runs on ONNX Runtime's CPUExecutionProvider; `device="cuda"` needs the
CUDAExecutionProvider (the onnxruntime-gpu wheel) and is refused otherwise — there
is no silent CPU fallback. Inputs cross as numpy arrays on CPU and through an
IOBinding of the torch tensors' device memory on CUDA. Models whose weights exceed
protobuf's 2 GB limit are written with external data to a temporary directory and
loaded from there.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from dsgraph.dtypes import dtype_name
from dsgraph.errors import BackendUnavailable, InputError

from ..base import Backend, CompiledGraph, KernelChoice, register_backend
from .export import EXTERNAL_DATA_BYTES, OPSET, export_onnx, model_bytes, save_onnx

_NUMPY_OK = {"float32", "float16", "float64", "int64", "int32", "bool"}


def _providers() -> list[str]:
    import onnxruntime as ort  # optional dependency (the [onnx] extra)
    return ort.get_available_providers()


class OnnxBackend(Backend):
    name = "onnx"

    # absorbed MLA, grouped MoE and cleanups, so the comparison runs the same graph as triton and tvm
    pipeline = ("cse", "fold_constants", "absorb_mla", "group_moe", "dce")

    def available(self, device: str) -> str | None:
        try:
            import onnx  # noqa: F401  (optional dependencies, the [onnx] extra: are they installed?)
            import onnxruntime  # noqa: F401  (the same)
        except ImportError as e:
            return f"{e.name} is not installed; pip install onnx onnxruntime"
        if str(device).startswith("cuda") and "CUDAExecutionProvider" not in _providers():
            return ("onnxruntime has no CUDAExecutionProvider here (available: " + ", ".join(_providers())
                    + "); pip install onnxruntime-gpu")
        return None

    def compile_graph(self, graph, weights, device, report, opset: int | None = None, threads: int | None = None,
                      **options):
        import onnxruntime as ort  # optional dependency (the [onnx] extra)
        opset = opset or OPSET
        if options:
            raise InputError(f"onnx backend: unknown options {sorted(options)}; it takes opset, threads")
        records: list = []
        model = export_onnx(graph, weights, opset=opset, records=records)
        for node, res in records:
            report.kernels.append(KernelChoice(tuple(v.name for v in node.outputs), node.op, res.kind, res.kernel,
                                               res.note))
        cuda = str(device).startswith("cuda")
        providers = ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self._tmp = None
        if model_bytes(model) > EXTERNAL_DATA_BYTES:
            self._tmp = tempfile.TemporaryDirectory(prefix="dsgraph-onnx-")
            path = save_onnx(model, Path(self._tmp.name) / f"{graph.name}.onnx", external_data=True)
            session = ort.InferenceSession(str(path), opts, providers=providers)
            report.notes.append(f"weights exceed 2 GB: loaded with external data from {path}")
        else:
            session = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        report.notes.append(f"ONNX opset {opset}, {len(model.graph.node)} ONNX nodes, "
                            f"providers {session.get_providers()}")
        report.notes.append("moe.experts exported dense: every expert runs on every token (exact, E/k x FLOPs)"
                            if any(n.op == "moe.experts" for n in graph.nodes) else "")
        report.notes = [n for n in report.notes if n]
        run = _cuda_runner(session, graph, device) if cuda else _cpu_runner(session, graph)
        compiled = CompiledGraph(graph, run, report)
        compiled.onnx_model = model
        compiled.session = session
        return compiled


def _feed_names(graph) -> list[str]:
    return [n for n, v in graph.inputs.items() if v.kind != "param"]


def _cpu_runner(session, graph):
    names, outs = _feed_names(graph), list(graph.outputs)

    def run(inputs):
        feed = {}
        for n in names:
            if n not in inputs:
                raise InputError(f"graph {graph.name} needs input {n!r}; got {sorted(inputs)}")
            t = inputs[n]
            if dtype_name(t.dtype) not in _NUMPY_OK:
                raise InputError(f"onnx backend on CPU takes {sorted(_NUMPY_OK)} inputs; {n!r} is "
                                 f"{dtype_name(t.dtype)}: compile in float32 or float16")
            feed[n] = t.detach().cpu().numpy()
        result = session.run(outs, feed)
        return {n: torch.from_numpy(np.ascontiguousarray(r)) for n, r in zip(outs, result)}
    return run


def _cuda_runner(session, graph, device):
    """IOBinding of torch CUDA tensors: inputs are read in place, outputs come back as torch tensors."""
    names, outs = _feed_names(graph), list(graph.outputs)
    dev = torch.device(device)

    def run(inputs):
        binding = session.io_binding()
        keep = []
        for n in names:
            t = inputs[n].to(dev).contiguous()
            keep.append(t)
            binding.bind_input(n, "cuda", dev.index or 0, _np_dtype(t.dtype), tuple(t.shape), t.data_ptr())
        for n in outs:
            binding.bind_output(n, "cuda", dev.index or 0)
        session.run_with_iobinding(binding)
        return {n: _ort_to_torch(v, dev) for n, v in zip(outs, binding.get_outputs())}
    return run


def _np_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16:
        raise BackendUnavailable("onnx backend: bfloat16 inputs cannot be bound from numpy types; use float16")
    return torch.empty((), dtype=dtype).numpy().dtype


def _ort_to_torch(value, dev) -> torch.Tensor:
    return torch.from_numpy(value.numpy()).to(dev)


register_backend("onnx", OnnxBackend)
