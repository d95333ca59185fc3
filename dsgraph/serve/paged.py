"""A paged KV cache: fixed-size blocks in one pool per cache tensor, a block table per request, and prefix
caching of full blocks by content hash.

Every cache input of a graph is [B, T, ...] (T the cache length), a fixed-size state [B, rows, ...] (V4's sliding
window and compressor rows: `states`, one slot per running request in `StateSlots`, not in blocks) or a compact cache
whose length is an expression of T (V4's compressed entries [B, T//m, D]: `compact`, kept per request in
`CompactEntries`, which only the contiguous path reads: every row of its calls is at one length); the pool holds
[num_blocks, block_size, ...] of each [B, T, ...] cache, so for absorbed MLA a block holds the latent rows, for GQA
the per-head K and V rows. The backends take contiguous caches, so a step gathers each request's blocks into [B, T,
...] and writes the rows it computed back (`gather` / `write`): correct on every backend. A backend with a paged
decode program (triton) reads and writes the pools in place instead; one block past `num_blocks` is its scratch
block, where padding rows of a CUDA-graph batch write (`pad_slot`), never handed out.

A full block is registered under the hash of (the hash of the block before it, its tokens): equal prefixes
share blocks (reference-counted). A block nobody holds stays cached until the pool needs it (oldest first).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from dsgraph.dtypes import to_torch
from dsgraph.errors import InputError
from dsgraph.symbolic import Sym


def block_hash(parent: int | None, block: list[int]) -> int:
    """A full block's content hash, chained to the hash of the block before it (None for the first)."""
    return hash((parent, tuple(block)))


def block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """The chained content hash of every full block of `tokens`."""
    out, parent = [], None
    for i in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[i:i + block_size])
        out.append(parent)
    return out


class BlockPool:
    """`num_blocks` blocks of `block_size` token rows for every cache input of `graph`."""

    def __init__(self, graph, num_blocks: int, block_size: int, device):
        if num_blocks < 1 or block_size < 1:
            raise InputError(f"a paged cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.storage, self.states, self.compact, self.device = {}, {}, {}, device
        for name, v in graph.inputs.items():
            if v.kind != "cache":
                continue
            dims = [str(d) for d in v.type.shape]
            if len(dims) >= 2 and dims[1] == "T":
                shape = v.type.concrete({"B": num_blocks + 1, "T": block_size})   # + the scratch block
                self.storage[name] = torch.zeros(shape, dtype=to_torch(v.type.dtype), device=device)
            elif v.type.is_fixed_state:
                self.states[name] = v.type   # a fixed-size state: one slot per running request (StateSlots)
            elif len(dims) >= 2 and dims[0] == "B" and isinstance(v.type.shape[1], Sym) \
                    and v.type.shape[1].symbols() == {"T"}:
                self.compact[name] = v.type  # entries as many as a function of T: per request (CompactEntries)
            else:
                raise InputError(f"cache input {name} has shape {v.type}: the paged cache needs [B, T, ...], a "
                                 "fixed-size state [B, rows, ...] or a compact cache [B, f(T), ...]")
        self.free: list[int] = list(range(num_blocks))[::-1]
        self.refs = [0] * num_blocks
        self.cached: dict[int, int] = {}               # content hash -> block
        self.hash_of: dict[int, int] = {}              # block -> content hash
        self.idle: OrderedDict[int, None] = OrderedDict()   # cached blocks nobody holds, oldest first
        self.hits = 0

    @property
    def pad_slot(self) -> int:
        """The first row of the scratch block, as a flat pool slot (block * block_size + offset)."""
        return self.num_blocks * self.block_size

    @property
    def available(self) -> int:
        return len(self.free) + len(self.idle)

    @property
    def used(self) -> int:
        return self.num_blocks - self.available

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (evicting idle cached ones, oldest first), or None without taking any."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.pop()
            else:
                b, _ = self.idle.popitem(last=False)
                del self.cached[self.hash_of.pop(b)]
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.idle[b] = None
                else:
                    self.free.append(b)

    def match_prefix(self, tokens: list[int]) -> list[int]:
        """The cached blocks holding the longest prefix of `tokens` (full blocks), each now held once more."""
        out = []
        for h in block_hashes(tokens, self.block_size):
            b = self.cached.get(h)
            if b is None:
                break
            if self.refs[b] == 0:
                self.idle.pop(b, None)
            self.refs[b] += 1
            out.append(b)
        self.hits += len(out)
        return out

    def register(self, table: list[int], tokens: list[int], upto: int, hashes: list[int]) -> None:
        """Record the full blocks of `table` among its first `upto` computed tokens under their content hash.
        `hashes` is the chain of the table's blocks already seen here, extended in place: each block is hashed
        once, when it fills, not on every step."""
        size = self.block_size
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), upto // size):
            parent = block_hash(parent, tokens[i * size:(i + 1) * size])
            hashes.append(parent)
            b = table[i]
            if b not in self.hash_of and parent not in self.cached:
                self.cached[parent], self.hash_of[b] = b, parent

    def gather(self, tables: list[list[int]], length: int) -> dict[str, torch.Tensor]:
        """The contiguous caches [len(tables), length, ...] of these block tables."""
        n = self.blocks_for(length)
        idx = torch.tensor([t[:n] for t in tables], dtype=torch.int64, device=self._device)
        return {name: s[idx].flatten(1, 2)[:, :length] for name, s in self.storage.items()}

    def write(self, tables: list[list[int]], caches: dict[str, torch.Tensor], start: int, end: int) -> None:
        """Store rows start..end of contiguous caches [B, >=end, ...] into the tables' blocks."""
        pos = torch.arange(start, end, device=self._device)
        blocks = torch.tensor([[t[p // self.block_size] for p in range(start, end)] for t in tables],
                              dtype=torch.int64, device=self._device)
        for name, s in self.storage.items():
            s[blocks, (pos % self.block_size).expand_as(blocks)] = caches[name][:, start:end].to(s.dtype)

    def check_rows(self, table: torch.Tensor, slots: torch.Tensor, lens: torch.Tensor, positions: torch.Tensor) -> None:
        """The integer inputs of a paged call, on the host before they go to the device: every block id inside
        the pool, every write slot a request's row or the scratch slot, every length within its row's table, no
        negative position. Out of range, a kernel would read or write past the pools; on a GPU that faults
        asynchronously and surfaces later as an unrelated error (e.g. CUBLAS_STATUS_EXECUTION_FAILED in the next
        GEMM), so the engine checks here, where it costs no device sync."""
        limits = (("block ids", table, self.num_blocks - 1), ("write slots", slots, self.pad_slot),
                  ("cache lengths", lens, table.shape[1] * self.block_size), ("positions", positions, None))
        for what, t, most in limits:
            low, high = int(t.min()), int(t.max())
            if low < 0 or (most is not None and high > most):
                raise InputError(f"paged cache: the {what} of a step's {table.shape[0]} rows span [{low}, {high}], "
                                 f"outside [0, {most if most is not None else 'any'}] (an engine bug: please "
                                 "report it with the requests that ran)")

    @property
    def _device(self):
        return self.device


class BlockTables:
    """The block tables of the requests in paged decode steps as rows of one int32 tensor in host memory. A
    request keeps its row while it runs and each block id is written once, when the block is added, so a step
    takes its batch's tables [B, width] in one indexing op instead of padding every table into a new tensor."""

    def __init__(self, rows: int, width: int = 16):
        self.buf = torch.zeros(rows, width, dtype=torch.int32)
        self.free = list(range(rows))[::-1]
        self.held: dict[str, tuple[int, int]] = {}    # request id -> (its row, block ids written)

    def rows(self, tables: list[tuple[str, list[int]]]) -> torch.Tensor:
        """The tables [len(tables), widest table] of these (request id, block table) pairs, zero-padded."""
        idx, width = [], 1
        for rid, table in tables:
            row, written = self.held.get(rid) or (self.free.pop(), 0)
            if len(table) > written:
                if len(table) > self.buf.shape[1]:
                    wider = torch.zeros(self.buf.shape[0], 1 << (len(table) - 1).bit_length(), dtype=torch.int32)
                    wider[:, :self.buf.shape[1]] = self.buf
                    self.buf = wider
                self.buf[row, written:len(table)] = torch.tensor(table[written:], dtype=torch.int32)
            self.held[rid] = (row, len(table))
            idx.append(row)
            width = max(width, len(table))
        return self.buf[idx, :width]

    def drop(self, rid: str) -> None:
        """The request left the batch (finished, aborted or preempted): its row is cleared for the next one."""
        held = self.held.pop(rid, None)
        if held is not None:
            self.buf[held[0]].zero_()
            self.free.append(held[0])


class StateSlots:
    """The fixed-size state caches (`BlockPool.states`) of the running requests: one pool [seats + 1, rows, ...]
    per state, a slot per request (zeroed when taken: a request starts from the empty state), the last slot the
    scratch where padding rows of a CUDA-graph batch write (`pad_slot`), never handed out."""

    def __init__(self, types: dict, seats: int, device):
        self.storage = {name: torch.zeros(t.concrete({"B": seats + 1}), dtype=to_torch(t.dtype), device=device)
                        for name, t in types.items()}
        self.free = list(range(seats))[::-1]
        self.pad_slot, self.device = seats, device

    def acquire(self) -> int:
        if not self.free:
            raise InputError(f"all {self.pad_slot} state slots are taken: the engine admitted more requests than "
                             "max_num_seqs")
        slot = self.free.pop()
        for s in self.storage.values():
            s[slot].zero_()
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def gather(self, slots: list[int]) -> dict[str, torch.Tensor]:
        """The states [len(slots), rows, ...] of these slots."""
        idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
        return {name: s.index_select(0, idx) for name, s in self.storage.items()}

    def write(self, slots: list[int], states: dict[str, torch.Tensor]) -> None:
        idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
        for name, s in self.storage.items():
            s.index_copy_(0, idx, states[name].to(s.dtype))


class CompactEntries:
    """The compact caches (`BlockPool.compact`, V4's [B, T//m, D] compressed entries) of the running requests, one
    tensor [f(T), ...] per request and cache: their entry count depends on each request's token count, so they fit
    no block of token rows. A request starts with none (`drop` on leaving: a resumed request prefills again)."""

    def __init__(self, types: dict, device):
        self.types, self.device = types, device
        self.held: dict[str, dict[str, torch.Tensor]] = {}   # request id -> cache name -> its entries

    def gather(self, rids: list[str], length: int) -> dict[str, torch.Tensor]:
        """The caches [len(rids), f(length), ...] of these requests, each `length` tokens in."""
        out = {}
        for name, t in self.types.items():
            empty = torch.zeros(t.concrete({"B": 1, "T": length})[1:], dtype=to_torch(t.dtype), device=self.device)
            rows = [self.held.get(rid, {}).get(name, empty) for rid in rids]
            if any(r.shape != empty.shape for r in rows):
                raise InputError(f"compact cache {name}: a request holds {[tuple(r.shape) for r in rows]} entries, "
                                 f"not {tuple(empty.shape)} after {length} tokens (an engine bug: please report it)")
            out[name] = torch.stack(rows)
        return out

    def write(self, rids: list[str], caches: dict[str, torch.Tensor]) -> None:
        """Keep each request's row of the caches [len(rids), f(T), ...] after a step."""
        for k, rid in enumerate(rids):
            self.held.setdefault(rid, {}).update({name: caches[name][k].clone() for name in self.types})

    def drop(self, rid: str) -> None:
        self.held.pop(rid, None)
