"""`dsgraph check-weights PATH`: find the tensors of a checkpoint that hold NaN or Inf.

A non-finite weight (a norm, an embedding row, an FP8 scale, an e4m3 NaN byte, one expert) does not fail a
load: it turns the logits into NaN and generation into token 0 forever, which is why generation raises
`NumericsError` pointing here. The scan reads one tensor at a time (in row blocks, so a huge embedding never
sits in memory twice), FP8 bytes widened to fp32, with a progress bar on stderr (dsgraph/progress.py).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open

from dsgraph.errors import CheckpointError
from dsgraph.progress import bar
from dsgraph.runtime.manifest import MANIFEST, read_manifest, verify_files

from .hf_shards import Shards

_BLOCK_ELEMENTS = 1 << 24  # about 64 MiB of fp32 per block


@dataclass(frozen=True)
class Finding:
    name: str
    nan: int
    inf: int
    numel: int

    def __str__(self) -> str:
        return f"{self.name}: {self.nan} NaN, {self.inf} Inf of {self.numel} values"


def _file_tensors(path: Path) -> list[tuple[str, int, Callable[[], torch.Tensor]]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            sizes = {k: _numel(f.get_slice(k).get_shape()) for k in keys}
    except Exception as e:  # safetensors raises its own SafetensorError for a damaged header
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None

    def read(k):
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(k)
    return [(k, sizes[k], lambda k=k: read(k)) for k in keys]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def tensors_of(path) -> list[tuple[str, int, Callable[[], torch.Tensor]]]:
    """(name, numel, reader) for every tensor of a checkpoint dir, an artifact dir (verified first) or one
    `.safetensors` file; nothing is read yet."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return _file_tensors(p)
    if p.is_dir() and (p / MANIFEST).exists():
        verify_files(p, read_manifest(p))
        return _file_tensors(p / "weights.safetensors")
    if p.is_dir():
        shards = Shards(p, progress=False)
        return [(k, _numel(i.shape), lambda k=k: shards.read(k)) for k, i in sorted(shards.info.items())]
    raise CheckpointError(f"{p} is neither a checkpoint directory, an artifact directory nor a .safetensors file")


def count_nonfinite(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of `t`, in row blocks; integer tensors are always finite."""
    if t.dtype.is_floating_point is False and t.dtype != torch.float8_e4m3fn:
        return 0, 0
    flat = t.reshape(-1)
    nan = inf = 0
    for start in range(0, flat.numel(), _BLOCK_ELEMENTS):
        block = flat[start:start + _BLOCK_ELEMENTS].float()
        nan += int(torch.isnan(block).sum())
        inf += int(torch.isinf(block).sum())
    return nan, inf


def scan(tensors: Iterable[tuple[str, int, Callable[[], torch.Tensor]]], progress: bool = True,
         label: str = "weights") -> list[Finding]:
    """Every tensor with a NaN or Inf, one tensor read at a time."""
    tensors = list(tensors)
    found = []
    with bar(sum(n for _, n, _ in tensors), f"checking {label}", unit=" values", unit_scale=True,
             show=progress) as b:
        for name, numel, read in tensors:
            nan, inf = count_nonfinite(read())
            if nan or inf:
                found.append(Finding(name, nan, inf, numel))
            b.update(numel)
    return found


def check_weights(path, progress: bool = True, out=None) -> list[Finding]:
    """Scan `path`, print what is wrong (or that all is finite) to `out` (stdout) and return the findings."""
    out = out or sys.stdout
    tensors = tensors_of(path)
    found = scan(tensors, progress=progress, label=Path(path).name)
    for f in found:
        print(f, file=out)
    print(f"{len(tensors)} tensors scanned: " + (f"{len(found)} hold NaN or Inf" if found else "all finite"),
          file=out)
    return found
