"""Host-side rules shared by the MoE, routing and FP8 templates: device/dtype checks and dot precision."""
from __future__ import annotations

import torch

from dsgraph.errors import BackendUnavailable, InputError

from ..runtime import interpreting

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = ["check_float", "check_device", "dot_precision", "interpreting"]


def check_device(what: str, t: torch.Tensor) -> None:
    """CPU tensors need the interpreter; anything but CPU/CUDA cannot run Triton."""
    if t.device.type == "cpu":
        if not interpreting():
            raise BackendUnavailable(f"{what}: CPU tensors need Triton's interpreter; set TRITON_INTERPRET=1 "
                                     "before importing triton, or move the tensors to CUDA")
    elif t.device.type != "cuda":
        raise BackendUnavailable(f"{what}: tensors on {t.device} cannot run Triton kernels; use CUDA or the CPU")


def check_float(what: str, **tensors: torch.Tensor) -> torch.dtype:
    """One float dtype and one device for all `tensors`; bf16 dots are refused on the interpreter (it gets
    them wrong). Returns the dtype."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise InputError(f"{what}: {name} has dtype {t.dtype}; use float16, bfloat16 or float32")
        if t.dtype != first.dtype or t.device != first.device:
            raise InputError(f"{what}: {name} is {t.dtype} on {t.device} but {first_name} is {first.dtype} on "
                             f"{first.device}; cast/move them to one dtype and device")
    check_device(what, first)
    if first.device.type == "cpu" and first.dtype == torch.bfloat16:
        raise InputError(f"{what}: Triton's interpreter computes tl.dot on bfloat16 wrongly; run bfloat16 on "
                         "CUDA, or use float16/float32 on the CPU")
    return first.dtype


def dot_precision(dtype: torch.dtype) -> str:
    """Exact ('ieee') fp32 dots: Triton's default tf32 misses the fp32 tolerance."""
    return "ieee" if dtype == torch.float32 else "tf32"
