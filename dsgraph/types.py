"""Tensor types: a shape of int or symbolic dims plus a dtype name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from .dtypes import dtype_name, is_float, itemsize
from .errors import ShapeError
from .symbolic import Dim, Sym, eval_dim, parse_dim


@dataclass(frozen=True)
class TensorType:
    """Shape and dtype of a value; dims may be symbols so one graph serves all sizes."""

    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(parse_dim(d) for d in self.shape))
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_float(self) -> bool:
        return is_float(self.dtype)

    @property
    def is_fixed_state(self) -> bool:
        """[B, R, ...] with every dim past the batch an int: a cache of this type is a fixed-size state (V4's
        sliding window and compressor rows), not one that grows along a length dim."""
        return self.rank >= 2 and all(isinstance(d, int) for d in self.shape[1:])

    def with_shape(self, shape: Iterable[Dim | str]) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: str) -> "TensorType":
        return TensorType(self.shape, dtype)

    def symbols(self) -> set[str]:
        out: set[str] = set()
        for d in self.shape:
            if isinstance(d, Sym):
                out |= d.symbols()
        return out

    def numel(self, env: Mapping[str, int] | None = None) -> int:
        n = 1
        for d in self.shape:
            n *= eval_dim(d, env or {})
        return n

    def nbytes(self, env: Mapping[str, int] | None = None) -> int:
        return self.numel(env) * itemsize(self.dtype)

    def concrete(self, env: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, env) for d in self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    def to_json(self) -> dict:
        return {"shape": [d if isinstance(d, int) else str(d) for d in self.shape], "dtype": self.dtype}

    @classmethod
    def from_json(cls, obj: dict) -> "TensorType":
        return cls(tuple(obj["shape"]), obj["dtype"])


def tt(shape: Iterable[Dim | str], dtype: str) -> TensorType:
    """Shorthand: tt(("B", "S", 4096), "bfloat16")."""
    return TensorType(tuple(shape), dtype)


def bind_symbols(ty: TensorType, tensor: torch.Tensor, env: dict[str, int], what: str) -> None:
    """Check a concrete tensor against a type, binding free symbols into `env`.

    Raises ShapeError naming `what` on rank, dim or dtype mismatch.
    """
    if tensor.dim() != ty.rank:
        raise ShapeError(f"{what}: expected rank {ty.rank} {ty}, got shape {tuple(tensor.shape)}")
    if dtype_name(tensor.dtype) != ty.dtype:
        raise ShapeError(f"{what}: expected dtype {ty.dtype}, got {dtype_name(tensor.dtype)}")
    pending = []
    for i, (d, n) in enumerate(zip(ty.shape, tensor.shape)):
        if isinstance(d, Sym):
            free = d.symbols() - env.keys()
            if len(d.terms) == 1 and len(free) == 1 and d.terms == {(next(iter(free)),): 1}:
                env[next(iter(free))] = int(n)
                continue
            if free:
                pending.append((i, d, n))
                continue
        if eval_dim(d, env) != n:
            raise ShapeError(f"{what}: dim {i} is {n}, expected {d} = {eval_dim(d, env)} "
                             f"(type {ty}, shape {tuple(tensor.shape)})")
    for i, d, n in pending:
        free = d.symbols() - env.keys()
        if free:
            raise ShapeError(f"{what}: cannot infer {sorted(free)} from dim {i} ({d}); "
                             "bind it through another input")
        if d.evaluate(env) != n:
            raise ShapeError(f"{what}: dim {i} is {n}, expected {d} = {d.evaluate(env)}")
