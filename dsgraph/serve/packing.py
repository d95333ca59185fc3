"""Every prefill chunk of an engine step packed into one [rows, S] batch of the paged program.

A step's prefill chunks have different lengths and start positions. Run one graph call each and a step with N
chunks makes N calls, each at a new (batch, length) shape: N times the host work, and on a GPU a new kernel
specialisation or tuned config for most chunk lengths. Instead every chunk is cut into rows of one bucketed
length S (ROW_LENGTHS, `row_length`) and all rows go through the paged program in one call:
- row j of a chunk of n tokens starting at position c holds positions c - pad + j*S ... c - pad + (j+1)*S - 1,
  pad = rows * S - n: the padding sits at the front of the chunk's first row, so the chunk's last token is the
  last column of its last row;
- every row carries its request's block table and its cache length `cache_lens` (the position after its last
  column): the attention kernels place a row's queries at the end of its length, so each real token sees exactly
  the keys before it; the rows of one chunk see each other's keys because each layer's `cache.append` writes
  every row before that layer's attention reads any;
- padding tokens are id 0 at position 0 (a valid RoPE row) and write their cache rows into the pool's scratch
  slot (`pad_slot`), never into a request's blocks; their outputs are dropped.
The padding costs at most S - 1 tokens per chunk, outside the engine's token budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsgraph.errors import DSGraphError

ROW_LENGTHS = (8, 16, 32, 64, 128)   # the lengths a packed call's rows may take
ROW_COST = 32     # a row's fixed cost in tokens' worth (its query tiles part-filled, its table read), for row_length


@dataclass(frozen=True)
class Chunk:
    """n = len(tokens) tokens of one request computed after its first `start`, its cache rows in `table`."""

    tokens: list[int]
    start: int
    table: list[int]


@dataclass
class Packed:
    """The paged program's integer inputs for one packed call, on the host, and where each chunk's last token's
    outputs are: row `last[i]`, column S - 1."""

    ids: torch.Tensor          # [rows, S] int64
    positions: torch.Tensor    # [rows, S] int64
    slots: torch.Tensor        # [rows, S] int64: flat pool slots (block * page + offset), pad_slot for padding
    lens: torch.Tensor         # [rows] int32: each row's cache length, its new rows included
    table: torch.Tensor        # [rows, width] int32
    last: list[int]


def row_length(lengths: list[int]) -> int:
    """The row length packing chunks of these lengths costs least: padded tokens plus ROW_COST per row (long rows
    fill an attention kernel's query tiles, short ones pad short chunks less); the longer one on a tie."""
    return min(reversed(ROW_LENGTHS), key=lambda s: sum(-(-n // s) * (s + ROW_COST) for n in lengths))


def table_width(blocks: int) -> int:
    """Block-table columns of a packed call: a power of two, so the tables' shapes take few values."""
    return 1 << max(0, blocks - 1).bit_length()


def pack(chunks: list[Chunk], page: int, pad_slot: int) -> Packed:
    """The packed rows of `chunks` over a pool of `page`-row blocks whose scratch slot is `pad_slot` (a few
    tensor ops per chunk, not per token: a step packs thousands of tokens)."""
    s = row_length([len(c.tokens) for c in chunks])
    width = table_width(max(-(-(c.start + len(c.tokens)) // page) for c in chunks))
    parts: list[list[torch.Tensor]] = [[], [], [], [], []]     # ids, positions, slots, lens, tables
    last, made = [], 0
    for c in chunks:
        n = len(c.tokens)
        if n == 0 or len(c.table) * page < c.start + n:
            raise DSGraphError(f"packed prefill: a chunk of {n} tokens after {c.start} needs "
                               f"{-(-(c.start + n) // page)} blocks, its table has {len(c.table)} (engine bug)")
        rows = -(-n // s)
        pos = torch.arange(c.start - (rows * s - n), c.start + n).view(rows, s)   # padding first: positions < start
        real = pos >= c.start
        ids = torch.zeros(rows, s, dtype=torch.int64)
        ids[real] = torch.tensor(c.tokens)
        table = torch.tensor(c.table[:width])
        at = pos.clamp(min=c.start)
        slots = torch.where(real, table[at // page] * page + at % page, pad_slot)
        parts[0].append(ids)
        parts[1].append(pos.clamp(min=0))
        parts[2].append(slots)
        parts[3].append(pos[:, -1] + 1)
        parts[4].append(torch.nn.functional.pad(table, (0, width - len(table))).expand(rows, width))
        made += rows
        last.append(made - 1)
    ids, positions, slots, lens, tables = (torch.cat(p) for p in parts)
    return Packed(ids, positions, slots, lens.int(), tables.int(), last)
