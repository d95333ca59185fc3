"""The tensors of a Hugging Face checkpoint directory, indexed by key without reading them.

`Shards` opens every `*.safetensors` file once (or the files named by
`model.safetensors.index.json`), records each key's file, shape and dtype from the
headers, and reads a tensor -- or a slice of one -- only when asked. Reads go
through safetensors' memory map, so a 600 GB checkpoint costs nothing until a
weight is used and never sits in memory twice.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from dsgraph.dtypes import ST_DTYPES
from dsgraph.errors import CheckpointError
from dsgraph.ops.mlp import dequant_fp8_block
from dsgraph.progress import LOAD_MIN_BYTES, LOAD_MIN_FILES, bar, track
from dsgraph.safefs import safe_name

from .hf_scales import read_scale

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str   # dsgraph dtype name

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * (1 if self.dtype in ("float8_e4m3fn", "float8_e8m0fnu", "int8", "uint8", "bool") else
                    2 if self.dtype in ("float16", "bfloat16") else 8 if self.dtype in ("float64", "int64") else 4)


def _read_index(index: Path) -> dict:
    """The index's weight_map (tensor -> shard file name), every name checked before any file is opened."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names, got "
                              f"{type(weight_map).__name__}")
    for f in set(weight_map.values()):
        safe_name(f, f"{index} shard", CheckpointError)
    return weight_map


def _header(f: Path) -> dict[str, TensorInfo]:
    """key -> TensorInfo from one shard's header; a damaged shard is a CheckpointError naming it."""
    try:
        with safe_open(str(f), "pt") as h:
            out = {}
            for key in h.keys():
                sl = h.get_slice(key)
                dt = sl.get_dtype()
                out[key] = TensorInfo(f, tuple(sl.get_shape()), ST_DTYPES.get(dt, dt))
            return out
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for a damaged header
        raise CheckpointError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e}); it is truncated "
                              "or damaged, download it again") from None


class Shards:
    """key -> TensorInfo for every tensor of a checkpoint directory; `read` loads one on demand."""

    def __init__(self, root: Path, progress: bool = True):
        """`progress`: a bar for indexing many shards and for the bytes read, where the load is big enough
        (dsgraph/progress.py)."""
        self.root = Path(root)
        self.files = self._files()
        many = len(self.files) >= LOAD_MIN_FILES
        self.info: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        for f in track(self.files, f"indexing {self.root.name}", unit="file", long=many, show=progress,
                       name=lambda f: f.name):
            for key, info in _header(f).items():
                if key in self.info:
                    raise CheckpointError(f"{self.root}: tensor {key!r} is stored twice, in "
                                          f"{self.info[key].file.name} and {f.name}; remove one copy")
                self.info[key] = info
        self._check_index()
        self.bytes_read = 0   # tensor data read so far (slices count their own size): what a sharded rank's load costs
        total = self.total_bytes
        self._bar = bar(total, f"loading {self.root.name}", unit="B", long=many or total >= LOAD_MIN_BYTES,
                        show=progress)

    def _files(self) -> list[Path]:
        index = self.root / INDEX_FILE
        if index.exists():
            self._weight_map = weight_map = _read_index(index)
            files = sorted({self.root / f for f in weight_map.values()})
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"{index} names shard files that are not in {self.root}: {absent}; "
                                      "download the missing shards")
            return files
        self._weight_map = None
        files = sorted(f for f in self.root.glob("*.safetensors") if f.is_file())
        if not files:
            other = sorted(p.name for p in self.root.glob("*.bin"))[:3]
            raise CheckpointError(f"{self.root}: no *.safetensors files"
                                  + (f" (found PyTorch pickles {other}: convert them to safetensors)" if other else ""))
        return files

    def _check_index(self) -> None:
        if self._weight_map is None:
            return
        wrong = [k for k, f in self._weight_map.items() if k not in self.info or self.info[k].file.name != f]
        if wrong:
            raise CheckpointError(f"{self.root / INDEX_FILE} lists {len(wrong)} tensors that are not in the file it "
                                  f"names, e.g. {wrong[:5]}; the index and the shards disagree")

    def __contains__(self, key: str) -> bool:
        return key in self.info

    def _handle(self, f: Path):
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), "pt")
        return self._handles[f]

    def read(self, key: str, index=None) -> torch.Tensor:
        """The tensor `key` (or `tensor[index]`, read without loading the rest)."""
        info = self.info[key]
        try:
            h = self._handle(info.file)
            t = h.get_tensor(key) if index is None else h.get_slice(key)[index]
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for damaged data
            raise CheckpointError(f"{info.file}: tensor {key!r} cannot be read ({type(e).__name__}: {e}); the shard "
                                  "is damaged, download it again") from None
        nbytes = t.numel() * t.element_size()
        self.bytes_read += nbytes
        self._bar.update(nbytes)
        if self.bytes_read >= self._bar.total:
            self._bar.close()   # every byte read: the bar goes
        return t

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.info.values())


def dequant_read(shards: Shards, name: str, scale: str, block: tuple[int, int], index,
                 scale_fmt: str | None = None) -> torch.Tensor:
    """FP8 weight `name` (all of it, or `tensor[index]` for slices along one dim) times its block scales (in
    `scale_fmt`, hf_scales.py), reading only the weight's slice and the scale blocks that cover it."""
    if index is None:
        return dequant_fp8_block(shards.read(name), read_scale(shards, scale, scale_fmt), block)
    d = len(index) - 1
    cut, b = index[d], block[d]
    lo = cut.start // b * b  # read from the block boundary, trim after dequantising
    w = shards.read(name, index[:d] + (slice(lo, cut.stop),))
    s = read_scale(shards, scale, scale_fmt, index[:d] + (slice(lo // b, -(-cut.stop // b)),))
    return dequant_fp8_block(w, s, block).narrow(d, cut.start - lo, cut.stop - cut.start).contiguous()

