"""Backends turn a graph into something that runs: eager (the oracle), triton, tvm, and for comparison
torch_compile and onnx. `get_backend(name)` finds one.

Importing the package registers every built-in backend; each imports its heavy dependency (triton, tvm, onnx)
only when it compiles, so this stays light."""
from . import eager, onnx, torch_compile, triton, tvm  # noqa: F401,E402  (register the built-in backends)
from .base import (  # noqa: F401
    Backend,
    CompiledGraph,
    CompileReport,
    KernelChoice,
    available_backends,
    backend_names,
    get_backend,
    register_backend,
)
