"""Sorting and counting primitives: argsort, cumsum, bincount.

They exist so the grouped MoE ops (`moe.permute` and friends) can be lowered to
primitives: sorting token copies by expert is a stable argsort, the per-expert
row counts a bincount, and the group offsets their running sum. Kept general
(any rank, any dim) so other lowerings can use them too.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from ..types import TensorType
from .common import expect_int, norm_dim
from .registry import Attr, defop, expect

ARGSORT = defop("argsort", "x", {"dim": Attr(int, -1), "descending": Attr(bool, False)},
                "int64 indices that sort x along dim; stable (ties keep their original order).")


@ARGSORT.infer
def _(x, dim, descending):
    norm_dim(dim, x.rank)
    expect(x.dtype != "bool", f"argsort input must be numeric, got {x}; cast it first")
    return x.with_dtype("int64")


ARGSORT.reference(lambda x, dim, descending: torch.argsort(x, dim=dim, descending=descending, stable=True))

CUMSUM = defop("cumsum", "x", {"dim": Attr(int)},
               "Inclusive running sum along dim; integer inputs stay integer, float sums in the input dtype.")


@CUMSUM.infer
def _(x, dim):
    norm_dim(dim, x.rank)
    expect(x.dtype != "bool", f"cumsum input must be numeric, got {x}; cast it to int64 first")
    return x


CUMSUM.reference(lambda x, dim: torch.cumsum(x, dim=dim, dtype=x.dtype))

BINCOUNT = defop("bincount", "x", {"length": Attr(int)},
                 "Counts of each value 0..length-1 in the 1-D int tensor x -> int64 [length]. "
                 "The length is static so the output type is known; a value outside it is an InputError.")


@BINCOUNT.infer
def _(x, length):
    expect_int(x, "bincount input")
    expect(x.rank == 1, f"bincount input must be 1-D, got {x}")
    expect(length > 0, f"bincount length must be positive, got {length}")
    return TensorType((length,), "int64")


@BINCOUNT.reference
def _(x, length):
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= length):
        raise InputError(f"bincount: values must lie in 0..{length - 1}, got range "
                         f"{int(x.min())}..{int(x.max())}; raise `length`")
    return torch.bincount(x, minlength=length)
