"""Weights live beside the graph in a lazy name -> tensor map.

An entry is a tensor or a zero-argument function that produces one (reading a
safetensors slice, dequantising FP8, or deriving absorbed/stacked weights from
other entries). Nothing is materialised until asked for, so a full-size
DeepSeek-V3 graph can be built, printed and transformed without its 671B
parameters in memory.
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping, Union

import torch

from .errors import CheckpointError

Entry = Union[torch.Tensor, Callable[[], torch.Tensor]]


class SliceableEntry:
    """A lazy entry that can read part of its tensor: `read(index)` with `index` a tuple of slices (None: all of
    it), so a rank of a sharded model reads only its slice from a checkpoint."""

    def __init__(self, read: Callable[[tuple | None], torch.Tensor]):
        self.read = read

    def __call__(self) -> torch.Tensor:
        return self.read(None)


class WeightStore(Mapping[str, torch.Tensor]):
    """`reader` is what the entries read from (a checkpoint's `Shards`, with `bytes_read`), or None."""

    def __init__(self, entries: Mapping[str, Entry] | None = None, reader=None):
        self._entries: dict[str, Entry] = dict(entries or {})
        self.reader = reader

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            entry = self._entries[name]
        except KeyError:
            raise CheckpointError(f"no weight named {name!r} ({len(self._entries)} weights present)") from None
        return entry() if callable(entry) else entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def set(self, name: str, entry: Entry) -> None:
        self._entries[name] = entry

    def pop(self, name: str) -> Entry:
        return self._entries.pop(name)

    def entry(self, name: str) -> Entry:
        return self._entries[name]

    def derive(self, name: str, fn: Callable[..., torch.Tensor], *sources: str) -> None:
        """Lazily define `name` as fn(*weights[sources]) (a weight transform of a pass)."""
        for s in sources:
            if s not in self._entries:
                raise CheckpointError(f"cannot derive {name!r}: source weight {s!r} is missing")
        self._entries[name] = lambda: fn(*(self[s] for s in sources))

    def copy(self) -> "WeightStore":
        return WeightStore(self._entries, self.reader)

    def slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """weights[name] narrowed to [start, stop) along dim, reading only that part where the entry can."""
        entry = self._entries.get(name)
        if isinstance(entry, SliceableEntry):
            return entry.read((slice(None),) * dim + (slice(start, stop),))
        return self[name].narrow(dim, start, stop - start).contiguous()

    def is_lazy(self, name: str) -> bool:
        return callable(self._entries[name])

    def materialize(self, names=None) -> "WeightStore":
        """Evaluate lazy entries (all, or `names`) into tensors."""
        out = dict(self._entries)
        for n in names if names is not None else list(out):
            out[n] = self[n]
        return WeightStore(out, self.reader)
