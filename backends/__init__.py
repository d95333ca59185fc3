"""Backends turn a graph into something that runs: eager (the oracle), triton, tvm,
and for comparison torch_compile and onnx. `get_backend(name)` finds one."""
from .base import Backend, CompiledGraph, CompileReport, KernelChoice, available_backends, get_backend, register_backend  # noqa: F401
