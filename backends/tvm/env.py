"""Can TVM build for a device here? Decided without importing TVM's compiler where possible.

Building needs apache-tvm with its compiler library (`libtvm_compiler.so`); a CUDA build also needs the CUDA
toolkit's nvcc (no GPU: the module is built here and run on the device machine). Running a saved module
needs only TVM's runtime (backends/tvm/runtime.py).
"""
from __future__ import annotations

import importlib.util
import os
import shutil

INSTALL_HINT = "pip install apache-tvm"


def find_nvcc() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def unavailable_reason(device: str) -> str | None:
    """None if this machine can build TVM modules for `device`, else why not and the fix."""
    if importlib.util.find_spec("tvm") is None:
        return f"apache-tvm is not installed; {INSTALL_HINT}"
    dev = str(device)
    if dev not in ("cpu",) and not dev.startswith("cuda"):
        return f"unknown device {device!r}; use 'cpu' (llvm) or 'cuda' (sm_90)"
    import tvm  # optional dependency (the [tvm] extra), known to be installed here
    if tvm.base._RUNTIME_ONLY:
        return ("TVM's compiler library (libtvm_compiler.so) is not loaded, so this install can only run saved "
                f"modules (dsgraph.load_artifact); for building, {INSTALL_HINT} (the full wheel)")
    if dev.startswith("cuda") and find_nvcc() is None:
        return ("no CUDA toolkit found (nvcc not on PATH, CUDA_HOME unset): TVM's cuda target compiles kernels "
                "with nvcc; install the CUDA toolkit, or use device='cpu'")
    return None
