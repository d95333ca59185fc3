"""The tensors of a Hugging Face checkpoint directory, indexed by key without reading them.

`Shards` opens every `*.safetensors` file once (or the files named by
`model.safetensors.index.json`), records each key's file, shape and dtype from the
headers, and reads a tensor -- or a slice of one -- only when asked. Reads go
through safetensors' memory map, so a 600 GB checkpoint costs nothing until a
weight is used and never sits in memory twice.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from dsgraph.errors import CheckpointError

log = logging.getLogger("dsgraph.models")

# safetensors header dtype -> dsgraph dtype name (FP8 e4m3 is DeepSeek-V3's weight format)
ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
             "F64": "float64", "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INDEX_FILE = "model.safetensors.index.json"
# show progress when a load reads at least this much, or the checkpoint has at least this many files
PROGRESS_MIN_BYTES = 2**30
PROGRESS_MIN_FILES = 8


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
        return n * (1 if self.dtype in ("float8_e4m3fn", "int8", "uint8", "bool") else
                    2 if self.dtype in ("float16", "bfloat16") else 8 if self.dtype in ("float64", "int64") else 4)


class Progress:
    """Bytes read so far, logged every 10% (only when the load is big enough to wait for)."""

    def __init__(self, total: int, enabled: bool, label: str):
        self.total, self.enabled, self.label = max(total, 1), enabled, label
        self.done = 0
        self._shown = -1

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        tenth = min(10, self.done * 10 // self.total)
        if tenth > self._shown:
            self._shown = tenth
            log.info(f"loading {self.label}: {self.done / 2**30:.2f} / {self.total / 2**30:.2f} GiB "
                     f"({10 * tenth}%)")


class Shards:
    """key -> TensorInfo for every tensor of a checkpoint directory; `read` loads one on demand."""

    def __init__(self, root: Path, progress: bool = True):
        self.root = Path(root)
        self.files = self._files()
        if progress and len(self.files) >= PROGRESS_MIN_FILES:
            log.info(f"indexing {len(self.files)} safetensors files in {self.root}")
        self.info: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        for f in self.files:
            with safe_open(str(f), "pt") as h:
                for key in h.keys():
                    sl = h.get_slice(key)
                    if key in self.info:
                        raise CheckpointError(f"{self.root}: tensor {key!r} is stored twice, in "
                                              f"{self.info[key].file.name} and {f.name}; remove one copy")
                    dt = sl.get_dtype()
                    self.info[key] = TensorInfo(f, tuple(sl.get_shape()), ST_DTYPES.get(dt, dt))
        self._check_index()
        self.progress = Progress(sum(i.nbytes for i in self.info.values()),
                                 progress and (len(self.files) >= PROGRESS_MIN_FILES or
                                               sum(i.nbytes for i in self.info.values()) >= PROGRESS_MIN_BYTES),
                                 self.root.name)

    def _files(self) -> list[Path]:
        index = self.root / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
            self._weight_map = weight_map
            files = sorted({self.root / f for f in weight_map.values()})
            absent = [f.name for f in files if not f.exists()]
            if absent:
                raise CheckpointError(f"{index} names shard files that are not in {self.root}: {absent}; "
                                      "download the missing shards")
            return files
        self._weight_map = None
        files = sorted(self.root.glob("*.safetensors"))
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
        h = self._handle(info.file)
        t = h.get_tensor(key) if index is None else h.get_slice(key)[index]
        self.progress.add(t.numel() * t.element_size())
        return t
