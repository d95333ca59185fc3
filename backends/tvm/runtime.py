"""Run a built TVM module with TVM's runtime alone: no compiler library, no Relax, no dsgraph lowering.

A compiled graph is two files: `module.so` (the exported VM executable with its kernels) and
`program.json` (the calling convention: input, parameter, derived-parameter and output names in order,
the device). `load_program(dir, graph, weights, device)` binds the weights once and returns the run
function the CompiledGraph calls. Tensors cross between torch and TVM through DLPack without copies
(a tensor whose data is not 64-byte aligned, as TVM requires, is copied once).

apache-tvm 0.27 loads only `libtvm_runtime.so` when `libtvm_compiler.so` is absent (or with
TVM_USE_RUNTIME_LIB=1); everything here works in that mode (see README.md for the minimal files).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from dsgraph.dtypes import dtype_name
from dsgraph.errors import ArtifactError, InputError
from dsgraph.interpreter import load_param
from dsgraph.types import bind_symbols

LIBRARY = "module.so"
PROGRAM = "program.json"
REPORT = "report.json"   # the compile report saved beside them (kernels and notes, shown again when loaded)

# Derived parameters are rebuilt from graph weights by name, so a runtime-only process needs no lowering code.
RECIPES = {"stack": lambda *ts: torch.stack(ts, dim=0)}


def tvm_device(device: torch.device):
    import tvm  # optional dependency (the [tvm] extra): TVM's runtime only
    if device.type == "cuda":
        return tvm.cuda(device.index or 0)
    return tvm.cpu(0)


def to_tvm(t: torch.Tensor):
    """torch -> (TVM tensor, torch owner of its memory), without a copy when the tensor is contiguous and
    64-byte aligned. Empty tensors (an empty KV cache) are made by TVM: torch gives them non-compact strides."""
    import tvm  # optional dependency (the [tvm] extra): TVM's runtime only
    if t.numel() == 0:
        return tvm.runtime.empty(tuple(t.shape), dtype_name(t.dtype), tvm_device(t.device)), t
    t = t.contiguous()
    if t.numel() and t.data_ptr() % 64:
        t = t.clone()
    return tvm.runtime.from_dlpack(t), t


class ProgramRunner:
    """A loaded VM executable with its weights bound; `run(inputs)` maps named tensors to named outputs."""

    def __init__(self, library, program: dict, graph, weights: Mapping[str, torch.Tensor], device: str):
        from tvm.runtime.vm import VirtualMachine  # optional dependency (the [tvm] extra): TVM's runtime only
        self.graph = graph
        self.program = program
        self.device = torch.device(device)
        self.vm = VirtualMachine(library, tvm_device(self.device))
        self.main = self.vm["main"]
        self._keep: list[torch.Tensor] = []  # torch owners of the bound weights' memory
        self.params = [self._bind(load_param(graph.inputs[n], weights, self.device)) for n in program["params"]]
        for d in program["derived"]:
            srcs = [load_param(graph.inputs[s], weights, self.device) for s in d["sources"]]
            t = RECIPES[d["recipe"]](*srcs)
            if tuple(t.shape) != tuple(d["shape"]):
                raise ArtifactError(f"derived parameter {d['name']}: {d['recipe']} gave {tuple(t.shape)}, "
                                    f"the module expects {tuple(d['shape'])}")
            self.params.append(self._bind(t))

    def _bind(self, t: torch.Tensor):
        arr, owner = to_tvm(t)
        self._keep.append(owner)
        return arr

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = self.program["inputs"]
        missing = [n for n in names if n not in inputs]
        unknown = sorted(set(inputs) - set(names))
        if missing or unknown:
            raise InputError(f"graph {self.graph.name} takes inputs {names}; missing {missing}, unknown {unknown}")
        env: dict[str, int] = {}
        args, owners = [], []
        for n in names:
            t = inputs[n]
            if not isinstance(t, torch.Tensor):
                raise InputError(f"input {n!r} must be a torch.Tensor, got {type(t).__name__}")
            bind_symbols(self.graph.inputs[n].type, t, env, f"input %{n}")
            arr, owner = to_tvm(t.to(self.device))
            args.append(arr)
            owners.append(owner)
        outs = self.main(*args, *self.params)
        return {name: torch.from_dlpack(o) for name, o in zip(self.program["outputs"], outs)}


def save_program(directory, executable, program: dict) -> None:
    """Export the executable as a shared library beside its calling convention."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    executable.export_library(str(d / LIBRARY))
    (d / PROGRAM).write_text(json.dumps(program, indent=1))


def load_runtime_sidecars(device: str) -> list[str]:
    """In runtime-only mode TVM loads libtvm_runtime.so alone, skipping its sidecar libraries; load those the
    module needs: libtvm_runtime_extra.so (the CPU sort/scan kernels argsort and top-k call) and, for CUDA,
    libtvm_runtime_cuda.so (the CUDA device API). With the compiler present TVM has loaded them already."""
    import tvm  # optional dependency (the [tvm] extra): TVM's runtime only
    from tvm_ffi.libinfo import load_lib_ctypes  # TVM's FFI package, installed with it
    loaded = tvm.base._LOADED_LIBS
    runtime_dir = Path(loaded["tvm_runtime"]._name).resolve().parent
    wanted = ["tvm_runtime_extra"] + (["tvm_runtime_cuda"] if torch.device(device).type == "cuda" else [])
    for name in wanted:
        if name not in loaded:
            try:
                loaded[name] = load_lib_ctypes("tvm", name, "RTLD_LOCAL", extra_lib_paths=[runtime_dir])
            except (OSError, RuntimeError) as e:
                raise ArtifactError(f"TVM runtime library lib{name}.so could not be loaded from {runtime_dir} ({e}); "
                                    "deploy it beside libtvm_runtime.so (see backends/tvm/README.md)") from None
    if torch.device(device).type == "cuda":
        register_cuda_jit()
    return wanted


def register_cuda_jit() -> None:
    """TVM 0.27 keeps CUDA kernels as source in the exported module and compiles them with NVRTC when the
    module is loaded, through the `tvm_callback_cuda_compile` hook. Its default hook asks the compiler's
    target registry for the architecture, which a runtime-only TVM lacks; this one asks the GPU instead."""
    import tvm_ffi  # TVM's FFI package, installed with it
    from tvm.support import nvcc  # optional dependency (the [tvm] extra): its NVRTC wrapper

    def compile_for_this_gpu(code, *_):
        major, minor = torch.cuda.get_device_capability()
        return nvcc.compile_cuda(code, target_format="cubin", arch=f"sm_{major}{minor}", compiler="nvrtc")
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_for_this_gpu, override=True)


def load_program(directory, graph, weights, device: str) -> ProgramRunner:
    """Load `module.so` + `program.json` with TVM's runtime only and bind `weights`."""
    import tvm  # optional dependency (the [tvm] extra): TVM's runtime only
    load_runtime_sidecars(device)
    d = Path(directory)
    for f in (LIBRARY, PROGRAM):
        if not (d / f).exists():
            raise ArtifactError(f"{d / f} is missing: not a saved tvm module (save with backend.save_compiled)")
    program = json.loads((d / PROGRAM).read_text())
    if torch.device(device).type != program["device"]:
        raise ArtifactError(f"{d} was built for {program['device']} ({program['target']}), not {device}; "
                            "rebuild it for this device")
    return ProgramRunner(tvm.runtime.load_module(str(d / LIBRARY)), program, graph, weights, device)
