"""Where Triton kernels can run, decided before triton is first imported.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the module defining it is imported. So the
backend switches the interpreter on itself for `device="cpu"` if triton is not imported yet, and refuses (naming
the fix) if triton was already imported without it. Kernel modules are only imported after `prepare`.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

from dsgraph.cache import cache_dir as dsgraph_cache_dir
from dsgraph.errors import BackendUnavailable


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: str) -> str | None:
    """None if Triton kernels can run on `device`, else why not and what to do."""
    try:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed; pip install triton"
    except ValueError:  # triton imported without a spec (unusual); it is there
        pass
    if str(device).startswith("cuda"):
        return None if torch.cuda.is_available() else "torch sees no CUDA GPU; use device='cpu' (Triton interpreter)"
    if str(device) != "cpu":
        return f"unknown device {device!r}; use 'cpu' or 'cuda'"
    if "triton" in sys.modules and not interpreting():
        return ("triton was imported without TRITON_INTERPRET=1, so its kernels cannot run on the CPU; "
                "set TRITON_INTERPRET=1 before importing triton (or before anything that imports it)")
    return None


def prepare(device: str) -> str | None:
    """Make Triton usable on `device`; returns a note for the compile report when it changed the environment."""
    reason = unavailable_reason(device)
    if reason:
        raise BackendUnavailable(f"triton backend cannot run on {device}: {reason}")
    note = None
    if str(device) == "cpu" and not interpreting():
        os.environ["TRITON_INTERPRET"] = "1"
        note = "set TRITON_INTERPRET=1 (triton was not imported yet): kernels run through Triton's CPU interpreter"
    elif str(device) == "cpu":
        note = "kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1)"
    return note


def cache_dir(kind: str) -> str:
    """Generated sources and tuned configs live under dsgraph's cache root ($DSGRAPH_CACHE_DIR)."""
    return str(dsgraph_cache_dir("triton", kind))
