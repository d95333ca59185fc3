"""Helpers shared by the type rules: broadcasting, dim normalisation, fp32 references."""
from __future__ import annotations

import torch

from ..symbolic import Dim, parse_dim
from ..types import TensorType
from .registry import expect


def norm_dim(dim: int, rank: int, what: str = "dim") -> int:
    expect(-rank <= dim < rank, f"{what}={dim} is out of range for rank {rank}")
    return dim % rank


def broadcast(a: TensorType, b: TensorType) -> tuple[Dim, ...]:
    """numpy broadcasting over symbolic dims: equal, or one side is 1."""
    ra, rb = a.shape[::-1], b.shape[::-1]
    out = []
    for i in range(max(len(ra), len(rb))):
        da = ra[i] if i < len(ra) else 1
        db = rb[i] if i < len(rb) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            expect(False, f"cannot broadcast {a} with {b} (dim -{i + 1}: {da} vs {db})")
    return tuple(out[::-1])


def same_dtype(*types: TensorType) -> str:
    dt = types[0].dtype
    for t in types[1:]:
        expect(t.dtype == dt, lambda: f"dtypes differ: {', '.join(str(x) for x in types)}; insert a cast")
    return dt


def expect_float(t: TensorType, what: str) -> None:
    expect(t.is_float, lambda: f"{what} must be a float tensor, got {t}")


def expect_int(t: TensorType, what: str) -> None:
    expect(t.dtype in ("int64", "int32"), lambda: f"{what} must be int64 or int32, got {t}")


def expect_rank(t: TensorType, rank: int, what: str) -> None:
    expect(t.rank == rank, lambda: f"{what} must have rank {rank}, got {t}")


def dims(*ds) -> tuple[Dim, ...]:
    return tuple(parse_dim(d) for d in ds)


def f32(x: torch.Tensor) -> torch.Tensor:
    """References compute in fp32 (fp64 stays fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def widest(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The operands in one compute dtype: fp32, or fp64 if any is (an fp32-pinned operand meeting fp64 ones)."""
    dt = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    return tuple(x.to(dt) for x in xs)
