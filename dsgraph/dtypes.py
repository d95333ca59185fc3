"""Dtype names used in the IR and their torch equivalents.

The IR stores dtypes as short strings so graphs serialise as plain data; torch
dtypes and the user-facing spellings ("bf16", "bfloat16", torch.bfloat16) all
normalise here.
"""
from __future__ import annotations

import torch

from .errors import InputError

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,     # MXFP4 weights: two e2m1 values a byte
    "uint8": torch.uint8,   # e8m0 scale exponents
    "bool": torch.bool,
}
_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
            "half": "float16", "float": "float32", "fp8": "float8_e4m3fn", "e4m3": "float8_e4m3fn"}
FLOAT_DTYPES = frozenset({"float32", "bfloat16", "float16", "float64", "float8_e4m3fn"})
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# safetensors header dtype -> dsgraph dtype name (FP8 e4m3 is DeepSeek-V3's weight format)
ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
             "F64": "float64", "F8_E8M0": "float8_e8m0fnu",
             "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def dtype_name(dtype: str | torch.dtype) -> str:
    """Normalise a torch dtype or a spelling such as "bf16" to the IR's name."""
    if isinstance(dtype, torch.dtype):
        for name, td in TORCH_DTYPES.items():
            if td == dtype:
                return name
        raise InputError(f"unsupported dtype {dtype}; use one of {sorted(TORCH_DTYPES)}")
    name = _ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in TORCH_DTYPES:
        raise InputError(f"unsupported dtype {dtype!r}; use one of "
                         f"{sorted(set(TORCH_DTYPES) | set(_ALIASES))}")
    return name


def compute_dtype(dtype: str | torch.dtype) -> str:
    """A dtype models can run in (fp32, bf16, fp16); anything else is a clear error."""
    name = dtype_name(dtype)
    if name not in COMPUTE_DTYPES:
        raise InputError(f"models run in {', '.join(COMPUTE_DTYPES)}, not {name}; "
                         "pass dtype='bf16' or 'fp32'")
    return name


def to_torch(dtype: str) -> torch.dtype:
    return TORCH_DTYPES[dtype_name(dtype)]


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=to_torch(dtype)).element_size()
