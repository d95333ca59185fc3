"""One-token decode steps over a paged KV cache: the whole running batch in one call, through block tables.

A serving engine keeps every request's cache rows in fixed-size blocks of one pool per cache tensor
(dsgraph/serve/paged.py). Gathering each request's blocks into a contiguous [B, T, ...] cache before a step costs
a copy of every cache per step and forces one call per cache length. The *paged program* lowers the same graph
with the pools as its cache inputs instead:
- each cache input is its pool [blocks, page, ...] (`PagedValues.pools`);
- `cache.append` writes each row's new entry at its flat pool slot (`cache_slots` [B, S]: block * page + offset)
  and hands the pool on;
- the attention ops read the pool through `block_table` [B, max_blocks] with each row's valid length
  `cache_lens` [B] (the triton MLA decode and flash kernels' block-table path); for V3.2 the indexer scores the
  paged key cache the same way (its scores then span the table's max_blocks * page rows) and sparse MLA reads the
  selected latent rows through the table; V4's attention can read a compressed entries' pool through the table
  too (rows gathered by torch before the kernel, which reads no block table yet), but V4's compact caches
  ([B, T//m, D]: an entry count per request's token count) fit no block of token rows, so `unsupported_reason`
  declines them and the engine keeps them per request on its contiguous path;
- each fixed-size state cache (V4's sliding window and compressor rows, TensorType.is_fixed_state) is a pool
  [slots, rows, ...] of one slot per request (`state_slots` [B]): the step gathers its rows' states, the program
  reads them as its plain state inputs, and their next values are written back at the same slots.
So requests of different lengths share one call, and nothing is copied but the new rows (and the states). The
same program runs a serving step's prefill chunks too (`PagedDecode.prefill`: rows of S tokens, queries at the end
of each row's length), every chunk of the step in one call (models without fixed-size states).

Under CUDA graphs (`capture`), a step pads its batch up to the next bucket (BUCKETS): padding rows have length 0
(their attention reads nothing and gives zeros) and write their row into a scratch slot the caller names
(`pad_slot`) and their states into each state pool's last slot, so every replay of a bucket's graph reads the same
buffers. Without capture (the CPU tests) the same buffers and padding run the program plainly. This applies where
every reader of an appended cache is one of PAGED_OPS; for any other graph `unsupported_reason` says why, and the
engine gathers contiguous caches instead.
"""
from __future__ import annotations

import warnings

import torch

from dsgraph.ir import Graph, Value
from dsgraph.types import TensorType

from . import decode_graphs

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)   # batch sizes a captured step pads up to
MIN_TABLE_WIDTH = 16                            # block-table width of the first buffers; doubles when outgrown

# the ops that read a pool through a block table, and the inputs that must then be appended caches
PAGED_OPS = {"attention.mla_absorbed": (1,), "attention.gqa": (1, 2), "attention.mla": (1, 2),
             "indexer.logits": (1,), "attention.mla_sparse_absorbed": (1,), "attention.sink": (4,)}


def unsupported_reason(graph) -> str | None:
    """None if the paged program can run `graph`'s decode step, else why not."""
    if not graph.cache_map:
        return "the graph has no KV cache"
    for name, v in graph.inputs.items():
        if v.kind == "cache" and not v.type.is_fixed_state and str(v.type.shape[1]) != "T":
            return (f"cache {name} {v.type} is compact (its entry count is a function of each request's token "
                    "count T, so it fits no block of token rows): the engine keeps it per request on the "
                    "contiguous path")
    why = decode_graphs.unsupported_reason(graph)
    if why:
        return why
    states = decode_graphs.fixed_states(graph)
    for name, v in graph.inputs.items():
        if v.kind != "cache" or name in states:
            continue
        appended = next(iter(v.users)).outputs[0]
        for reader in appended.users:
            slots = PAGED_OPS.get(reader.op)
            if slots is None:
                return f"{reader.op} reads the appended cache {name} (only {', '.join(PAGED_OPS)} read a block table)"
            if not all(reader.inputs[i].node is not None and reader.inputs[i].node.op == "cache.append"
                       for i in slots):
                return f"{reader.op} mixes cached and uncached keys/values"
    return None


class PagedValues:
    """The paged program's values: a pool per cache input, the pool after each `cache.append` wrote into it (the
    same tensor, later in the dataflow: attention reads that one), and the step inputs `block_table`,
    `cache_slots`, `cache_lens`. Made before lowering: a fused region may reach an appended cache before the
    append itself is lowered."""

    def __init__(self, graph: Graph, cache_lens: Value):
        self.graph = graph
        self.pools: dict[str, Value] = {}
        self._alias: dict[int, Value] = {}
        self.states = decode_graphs.fixed_states(graph)   # plain inputs: the runner gathers them from their pools
        for name, v in graph.inputs.items():
            if v.kind == "cache" and name not in self.states:
                t = TensorType(("blocks", "page", *v.type.shape[2:]), v.type.dtype)
                self.pools[name] = self._alias[id(v)] = Value(name, t, kind="cache")
                for append in v.users:
                    out = append.outputs[0]
                    self._alias[id(out)] = Value(f"{out.name}.pool", t, kind="cache")
        self.inputs = {"block_table": Value("block_table", TensorType(("B", "max_blocks"), "int32"),
                                            kind="activation"),
                       "cache_slots": Value("cache_slots", TensorType(("B", "S"), "int64"), kind="activation"),
                       "cache_lens": cache_lens}

    def value(self, v: Value) -> Value:
        """The pool standing for cache value `v` (a cache input or an appended cache), the paged form of a value
        made from one (`keyed`), else `v` itself."""
        return self._alias.get(id(v), v)

    def keyed(self, out: Value) -> Value:
        """The paged form of `out` [..., T + S] (the indexer's scores, one per key): its last dim is the block
        table's width in rows (`paged_keys`), since the pools bind no cache length T."""
        t = out.type
        v = self._alias[id(out)] = Value(f"{out.name}.paged", TensorType((*t.shape[:-1], "paged_keys"), t.dtype))
        return v

    def program_graph(self) -> Graph:
        """The graph as the paged program sees it: pools in place of the growing cache inputs, no outputs for them
        (the pools are updated in place); fixed-size states in and out as they are. A view for the executor only:
        its nodes are the original graph's."""
        g = Graph(f"{self.graph.name}.paged")
        g.inputs = {n: self.pools.get(n, v) for n, v in self.graph.inputs.items()}
        g.nodes = self.graph.nodes
        nexts = {o for n, o in self.graph.cache_map.items() if n not in self.states}
        g.outputs = {k: v for k, v in self.graph.outputs.items() if k not in nexts}
        g.cache_map = {n: o for n, o in self.graph.cache_map.items() if n in self.states}   # the states' next values
        g.meta = self.graph.meta
        return g


def append_paged(pool: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`cache.append` in the paged program: new [B, S, ...] written at the flat slots [B, S] of pool
    [blocks, page, ...]; returns the pool."""
    pool.view(-1, *pool.shape[2:]).index_copy_(0, slots.reshape(-1), new.reshape(-1, *new.shape[2:]).to(pool.dtype))
    return pool


def bucket_for(batch: int) -> int | None:
    return next((b for b in BUCKETS if b >= batch), None)


def run_with_states(program, inputs: dict, pools: dict[str, torch.Tensor], slots: torch.Tensor | None) -> dict:
    """The paged program on `inputs` with each fixed-size state (program.graph.cache_map: name -> next) gathered
    from its pool at `slots` [B] and its next value written back there; the outputs without the states."""
    if not pools:
        return program(inputs)
    out = program({**inputs, **{n: p.index_select(0, slots) for n, p in pools.items()}})
    for name, p in pools.items():
        p.index_copy_(0, slots, out.pop(program.graph.cache_map[name]))
    return out


class _Bucket:
    """The static inputs of one batch bucket: token ids, positions, block table, write slots, lengths, and the
    state slots (padding rows: each state pool's last slot, its scratch)."""

    def __init__(self, program, size: int, width: int, pools: dict[str, torch.Tensor],
                 states: dict[str, torch.Tensor]):
        dev = program.device
        self.program, self.size, self.width, self.pools, self.states = program, size, width, pools, states
        self.ids = torch.zeros((size, 1), dtype=torch.int64, device=dev)
        self.positions = torch.zeros((size, 1), dtype=torch.int64, device=dev)
        self.table = torch.zeros((size, width), dtype=torch.int32, device=dev)
        self.slots = torch.zeros((size, 1), dtype=torch.int64, device=dev)
        self.lens = torch.zeros(size, dtype=torch.int32, device=dev)
        self.state_slots = torch.zeros(size, dtype=torch.int64, device=dev)
        self.scratch = min((p.shape[0] - 1 for p in states.values()), default=0)
        self.graph = None
        self.outputs = None

    def fits(self, width: int, pools: dict[str, torch.Tensor], states: dict[str, torch.Tensor]) -> bool:
        return width <= self.width and all(self.pools[n] is p for n, p in pools.items()) \
            and all(self.states[n] is p for n, p in states.items())

    def load(self, inputs: dict, pad_slot: int) -> None:
        b, w = inputs["block_table"].shape
        self.ids[:b].copy_(inputs["input_ids"])
        self.positions[:b].copy_(inputs["positions"])
        self.table.zero_()
        self.table[:b, :w].copy_(inputs["block_table"])
        self.slots.fill_(pad_slot)
        self.slots[:b].copy_(inputs["cache_slots"])
        self.lens.zero_()
        self.lens[:b].copy_(inputs["cache_lens"])
        if self.states:
            self.state_slots.fill_(self.scratch)
            self.state_slots[:b].copy_(inputs["state_slots"])

    def run(self) -> dict:
        return run_with_states(self.program, {"input_ids": self.ids, "positions": self.positions, **self.pools,
                                              "block_table": self.table, "cache_slots": self.slots,
                                              "cache_lens": self.lens}, self.states, self.state_slots)

    def capture(self, mempool) -> None:
        """Warm up on a side stream (kernel compiles, autotuning), then capture; the warm-up writes the rows the
        replay writes again."""
        dev = self.program.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self.run()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=mempool):
            self.outputs = self.run()
        self.graph = graph


class PagedDecode:
    """`compiled.paged_decode` of the triton backend: `(inputs, pad_slot) -> outputs` of one-token steps over
    the pools (inputs: input_ids [B,1], positions [B,1], each cache input's pool, block_table [B, W] int32,
    cache_slots [B,1] int64, cache_lens [B] int32 counting the new row; with fixed-size states each one's pool
    [slots + 1, rows, ...] under its name, the last slot scratch, and state_slots [B] int64), and `prefill` for
    rows of many tokens. `build` lowers the paged program on first use; `capture` replays CUDA graphs per batch
    bucket (False: the same buffers run uncaptured). The caller checks the ranges of block_table, cache_slots and
    cache_lens on the host (dsgraph/serve/paged.py `BlockPool.check_rows`): the program's kernels do not, which
    would sync the device at every attention op."""

    def __init__(self, build, capture: bool, report=None):
        self._build = build
        self.program = None
        self.capture = capture
        self.report = report
        self.buckets: dict[int, _Bucket] = {}
        self.graphs_off: str | None = None if capture else "capture disabled"
        self._mempool = None
        self.stats = {"steps": 0, "graph_replays": 0, "captures": 0, "padded_rows": 0, "unbucketed_steps": 0,
                      "prefill_calls": 0}

    def prepare(self) -> None:
        """Lower the paged program now (a DSGraphError says why it cannot be)."""
        if self.program is None:
            self.program = self._build()

    def __call__(self, inputs: dict, pad_slot: int) -> dict:
        self.prepare()
        b, w = inputs["block_table"].shape
        size = bucket_for(b)
        self.stats["steps"] += 1
        graph = self.program.graph
        states = {n: inputs[n] for n in graph.cache_map}
        if size is None:     # beyond the largest bucket: one plain call at the batch's own size
            self.stats["unbucketed_steps"] += 1
            return run_with_states(self.program, {n: t for n, t in inputs.items() if n not in states
                                                  and n != "state_slots"}, states, inputs.get("state_slots"))
        pools = {n: inputs[n] for n, v in graph.inputs.items() if v.kind == "cache" and n not in states}
        bucket = self.buckets.get(size)
        if bucket is None or not bucket.fits(w, pools, states):
            width = max(MIN_TABLE_WIDTH, 1 << (w - 1).bit_length(), bucket.width if bucket else 0)
            bucket = self.buckets[size] = _Bucket(self.program, size, width, pools, states)
        bucket.load(inputs, pad_slot)
        self.stats["padded_rows"] += size - b
        out = self._step(bucket)
        return {k: t[:b].clone() for k, t in out.items()}

    def prefill(self, inputs: dict) -> dict:
        """Rows of S > 1 tokens each (a serving step's prefill chunks packed by dsgraph/serve/packing.py) in one
        plain call of the paged program: the inputs of `__call__`, with input_ids, positions and cache_slots
        [B, S] and each row's queries the last S positions of its cache_lens. Their shapes change from step to
        step, so no CUDA graph; the caller points padding columns' slots at the scratch block."""
        self.prepare()
        self.stats["prefill_calls"] += 1
        return self.program(inputs)

    def _step(self, bucket: _Bucket) -> dict:
        if self.graphs_off:
            return bucket.run()
        try:
            if bucket.graph is None:
                self._mempool = self._mempool or torch.cuda.graph_pool_handle()
                bucket.capture(self._mempool)
                self.stats["captures"] += 1
            bucket.graph.replay()
        except Exception as e:  # noqa: BLE001  (a failed capture must not lose the step: say so, run it plainly)
            self._graphs_off(e)
            return bucket.run()
        self.stats["graph_replays"] += 1
        return bucket.outputs

    def _graphs_off(self, error: Exception) -> None:
        self.graphs_off = f"{type(error).__name__}: {error}"
        for bucket in self.buckets.values():
            bucket.graph = bucket.outputs = None
        msg = f"paged decode CUDA graphs disabled, steps run without them: {self.graphs_off}"
        if self.report is not None:
            self.report.notes.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def describe(self) -> str:
        graphs = f"CUDA graphs per batch bucket {BUCKETS}" if not self.graphs_off else \
            f"no CUDA graphs ({self.graphs_off})"
        return f"paged: one block-table decode call per step for the whole batch, {graphs}"

