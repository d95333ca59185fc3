"""One-token decode steps replayed from CUDA graphs.

A decode step of a full model launches hundreds of small kernels; at batch 1 launching them (Python dispatch
plus the CUDA launch) costs more than running them. A CUDA graph replays the whole step with one launch, but it
fixes every pointer and scalar argument, and a growing cache changes both: `cache.append` writes one row further
every step and attention reads one row more.

So a graphed step runs the same lowered program in *static-capacity* form:
- each cache lives in a buffer of fixed capacity C along the length dim, and the program is given a view of its
  first C - 1 rows: `cache.append` then returns the whole buffer, and every shape is the same at every step;
- the true length lives on the device: `cache.append` writes the new row at it (`index_copy_`) and the attention
  kernels ignore the rows past it (`cache_lens` of the absorbed-MLA kernel, `kv_lens` of the flash kernel).
  The program takes those device tensors as two optional inputs (LENGTH_INPUTS: the steps of `cache.append` and
  of the attention ops read them); called without them, it runs the plain growing-cache step.
Between replays only those device tensors, the token ids and the positions change. There is one graph per batch
size, capacity and epilogue; a sequence that outgrows C moves to a larger capacity (copied over and captured once).
An epilogue (the runtime's sampler: a callable from the step's outputs to more outputs, over device buffers of its
own that its caller fills before each step) is captured with the step, so a replay hands back the chosen ids.

A compact cache (V4's compressed entries [B, T//m, D]) lives in a buffer of capacity C//m: its views hold
T//m rows, and each step writes its one candidate entry (`v4.compress` takes the token count from the device-side
`cache_rows`, LENGTH_READERS) at row T//m, which the readers see only once the step completes the group (the
attention and the indexer's top-k bound their reads by the query positions); a later step overwrites an
incomplete group's row.

This applies when every op that reads a cache is one of those (absorbed MLA, which the triton pipeline makes of
every MLA model, GQA/MHA attention, V3.2's indexer and sparse MLA), or one whose contract bounds its reads by the
query positions (POSITION_BOUNDED: V4's attention over its compressed entries reads only slots at or before the
query, so the buffer's unwritten rows are never read), possibly through row-wise ops that keep rows apart
(ROW_WISE: the FP8 latent cache's dequantisation and the concat of its parts), which are as right over the whole
buffer as over its first rows, and no all_to_all's split sizes come back to the host; for any other graph the
compile report says why decode runs without them. A sharded graph's all-reduces and all-gathers are captured with
the step (NCCL supports capture).

Fixed-size state caches (a cache whose type has no length dim and whose next value keeps that type: V4's sliding
window and compressor rows, `cache.slide`) have the same shape at every step, so any op may read them: the step
reads them from static buffers of their own, which each step copies the given state into (a few rows per layer),
and hands back its next states as fresh tensors (never the graph's own output memory, which the next replay
overwrites), so they need none of the view rules below.

The growing caches handed out are views of the buffers under kv_cache's rules: a step writes in place only from the
newest view (or one `kv_cache.rewind` released); a step from an older state runs the plain program, which copies. A
state from elsewhere (a prefill) is copied in when no view of the buffers is still alive, else into fresh buffers.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from dsgraph.dtypes import to_torch
from dsgraph.errors import DSGraphError
from dsgraph.ir import Value
from dsgraph.symbolic import eval_dim
from dsgraph.types import TensorType

from .. import kv_cache

QUANTUM = 1024    # capacities are multiples of this ...
GROWTH = 1.25     # ... at least 1.25 x the length that needs them
MAX_BATCH_SIZES = 4  # graphs kept at once (a new batch size or epilogue drops the one placed longest ago)


_BYTE_FLOATS = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass
class StaticLengths:
    """The device-side lengths of a static-capacity step."""

    rows: torch.Tensor  # [S] int64: the cache rows this step writes
    lens: torch.Tensor  # [B] int32: valid cache rows once they are written


    def inputs(self) -> dict[str, torch.Tensor]:
        """The program's optional inputs that make a step static-capacity."""
        return {"cache_rows": self.rows, "cache_lens": self.lens}


def length_inputs() -> dict[str, Value]:
    """The values of a lowered program's optional inputs `cache_rows` [S] and `cache_lens` [B] (a fresh pair per
    program: steps read them like any value)."""
    return {"cache_rows": Value("cache_rows", TensorType(("S",), "int64"), kind="activation"),
            "cache_lens": Value("cache_lens", TensorType(("B",), "int32"), kind="activation")}


def extend_static(cache: torch.Tensor, s: int) -> torch.Tensor:
    """The view of `cache`'s storage extended by `s` rows (the whole buffer) that a static-capacity step's
    `cache.append` returns; its shape never changes. Nothing is written."""
    b, t = cache.shape[0], cache.shape[1]
    shape = (b, t + s, *cache.shape[2:])
    end = cache.storage_offset() + sum((n - 1) * st for n, st in zip(shape, cache.stride())) + 1
    if 0 not in shape[2:] and cache.untyped_storage().nbytes() < end * cache.element_size():   # rows of no bytes
        # (V4's token count cache [B, T, 0]) always have room
        raise DSGraphError(f"static-capacity decode: cache {tuple(cache.shape)} has no room for {s} more rows; "
                           "static steps need the decode buffers of backends/triton/decode_graphs.py")
    return cache.as_strided(shape, cache.stride(), cache.storage_offset())


def append_static(cache: torch.Tensor, new: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`cache.append` in a static-capacity step: write `new` at the device-side `rows` of `extend_static`'s view."""
    full = extend_static(cache, new.shape[1])
    if full.dtype in _BYTE_FLOATS:   # torch has no index_copy_ for FP8: copy the bytes
        full.view(torch.uint8).index_copy_(1, rows, new.view(torch.uint8))
    else:
        full.index_copy_(1, rows, new)
    return full


# the ops that take a cache's length from the device, and which of their inputs may be an appended cache
LENGTH_AWARE = {"attention.mla_absorbed": (1,), "attention.gqa": (1, 2), "attention.mla": (1, 2),
                "indexer.logits": (1,), "indexer.logits_fp8": (1, 2), "attention.mla_sparse_absorbed": (1,)}
# the ops whose contract bounds their reads of an appended cache by the query positions (only rows t <= p), so rows
# past the length of a static buffer are never read, and which of their inputs may be an appended cache
POSITION_BOUNDED = {"attention.sink": (4,)}
ROW_WISE = ("kv.dequant_fp8", "concat (last dim)")
# the ops that read a cache input's length only (V4's compressors: the token count T of `cache.tokens`), and which
# input: a static step gives them the device-side length instead (`cache_rows`), so they write one candidate entry
LENGTH_READERS = {"v4.compress": 5}
SAFE_READERS = {op: slots for table in (LENGTH_AWARE, POSITION_BOUNDED) for op, slots in table.items()}


def _row_wise(node) -> bool:
    """An op of ROW_WISE whose rows stay apart: kv.dequant_fp8, or a concat along the last dim."""
    if node.op == "kv.dequant_fp8":
        return True
    return node.op == "concat" and node.attrs["dim"] in (-1, len(node.outputs[0].shape) - 1)


def from_appended_cache(v: Value) -> bool:
    """v is an appended cache, or a row-wise (ROW_WISE) view of one: an attention reading it must mask by the
    device-side length in a static-capacity step."""
    node = v.node
    return node is not None and (node.op == "cache.append" or _row_wise(node) and any(
        from_appended_cache(i) for i in node.inputs))


def _reader_reason(value: Value, name: str) -> str | None:
    for reader in value.users:
        if _row_wise(reader):
            why = _reader_reason(reader.outputs[0], name)
        else:
            slots = SAFE_READERS.get(reader.op, ())
            ok = any(i < len(reader.inputs) and reader.inputs[i] is value for i in slots) \
                and reader.inputs[0] is not value
            why = None if ok else (f"{reader.op} reads the appended cache {name} (only {', '.join(LENGTH_AWARE)} "
                                   f"mask by a device-side length and {', '.join(POSITION_BOUNDED)} by the query "
                                   f"positions, through {', '.join(ROW_WISE)})")
        if why:
            return why
    return None


def fixed_states(graph) -> set[str]:
    """The graph's fixed-size state caches (TensorType.is_fixed_state)."""
    return {n for n, v in graph.inputs.items() if v.kind == "cache" and v.type.is_fixed_state}


def unsupported_reason(graph) -> str | None:
    """None if every reader of a growing cache is `cache.append` and every reader of an appended cache an op that
    masks by a device-side length (LENGTH_AWARE) or reads only rows at or before its query positions
    (POSITION_BOUNDED), directly or through row-wise ops (ROW_WISE), and every fixed-size state's next value keeps
    its type, else which op would read the cache on the host's length. Collectives of a sharded graph capture (NCCL
    supports it), but `dist.all_to_all` reads its split sizes on the host: a graph with one (EP dispatch under DP
    attention) decodes without CUDA graphs."""
    if graph.find("dist.all_to_all"):
        return ("dist.all_to_all reads its data-dependent split sizes on the host (a fixed-size dispatch kernel, "
                "DeepEP's low-latency mode, would capture)")
    states = fixed_states(graph)
    for name, v in graph.inputs.items():
        if v.kind != "cache":
            continue
        if name in states:
            nxt = graph.outputs.get(graph.cache_map.get(name, ""))
            if nxt is None or nxt.type != v.type:
                return (f"fixed-size state {name} {v.type} has next value {nxt and nxt.type} (a static step "
                        "needs it to keep its type)")
            continue
        for user in v.users:
            if LENGTH_READERS.get(user.op) is not None and user.inputs[LENGTH_READERS[user.op]] is v \
                    and v not in user.inputs[:LENGTH_READERS[user.op]]:
                continue
            if user.op != "cache.append" or user.inputs[0] is not v:
                return f"{user.op} reads cache {name} (only cache.append writes at a device-side length)"
            why = _reader_reason(user.outputs[0], name)
            if why:
                return why
    return None


def capacity_for(length: int, limit: int | None) -> int:
    """The buffer capacity for a sequence that needs `length` cache rows."""
    cap = -(-int(length * GROWTH) // QUANTUM) * QUANTUM
    return max(length, min(cap, limit)) if limit else cap


class _Buffers:
    """The static inputs of one graph: cache buffers of one capacity, token ids, positions, device lengths."""

    def __init__(self, program, batch: int, capacity: int, capture: bool, epilogue=None):
        self.program, self.capacity, self.epilogue = program, capacity, epilogue
        dev = program.device
        self.caches, self.states, self.dims = {}, {}, {}
        for name, v in program.runtime_inputs.items():
            if v.kind == "cache":
                buf = torch.zeros(v.type.concrete({"B": batch, "T": capacity}), dtype=to_torch(v.type.dtype),
                                  device=dev)
                if v.type.is_fixed_state:
                    self.states[name] = buf
                else:
                    kv_cache.view(buf, 0)
                    self.caches[name], self.dims[name] = buf, v.type.shape[1]
        self.ids = torch.zeros((batch, 1), dtype=torch.int64, device=dev)
        self.positions = torch.zeros((batch, 1), dtype=torch.int64, device=dev)
        self.lengths = StaticLengths(torch.zeros(1, dtype=torch.int64, device=dev),
                                     torch.zeros(batch, dtype=torch.int32, device=dev))
        self.capture = capture
        self.graph = None
        self.outputs = None

    def rows(self, name: str, length: int) -> int:
        """Rows of cache `name` after `length` tokens (length itself, or length // m for a compact cache)."""
        return eval_dim(self.dims[name], {"T": length})

    def owns(self, cache: torch.Tensor, name: str) -> bool:
        return kv_cache.buffer_of(cache) is self.caches[name]

    def in_use(self) -> bool:
        return any(kv_cache.in_use(b) for b in self.caches.values())

    def _run(self) -> dict:
        out = self.program({"input_ids": self.ids, "positions": self.positions, **self.lengths.inputs(),
                            **{n: b[:, :self.rows(n, self.capacity - 1)] for n, b in self.caches.items()},
                            **self.states})
        return out if self.epilogue is None else {**out, **self.epilogue(out)}

    def step(self, ids: torch.Tensor, positions: torch.Tensor, length: int, states: dict) -> dict:
        """Run (the first time: warm up, then capture) one step that writes cache row `length` after the
        fixed-size `states`."""
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        for name, st in states.items():
            self.states[name].copy_(st)
        self.lengths.rows.fill_(length)
        self.lengths.lens.fill_(length + 1)
        if not self.capture:
            return self._run()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.outputs

    def _capture(self) -> None:
        """Warm up on a side stream (compiles kernels, settles autotuning, which never times inside a capture),
        then capture. The warm-up writes the same cache row the replay then writes again."""
        side = torch.cuda.Stream(self.program.device)
        side.wait_stream(torch.cuda.current_stream(self.program.device))
        with torch.cuda.stream(side):
            self._run()
        torch.cuda.current_stream(self.program.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = self._run()
        self.graph = graph


class DecodeGraphs:
    """`compiled.decode_step` of the triton backend: one-token steps through static-capacity graphs.

    `capture=False` runs the same static-capacity program without capturing (the CPU tests check it that way)."""

    def __init__(self, program, cache_map: dict[str, str], max_length: int | None, capture: bool = True,
                 report=None):
        self.program = program
        self.cache_map = cache_map
        self.states = {n for n in cache_map if program.runtime_inputs[n].type.is_fixed_state}   # copied in each step
        self.max_length = max_length
        self.capture = capture
        self.report = report
        self.buffers: dict[int, _Buffers] = {}
        self.disabled: str | None = None
        self.stats = {"graph_steps": 0, "plain_steps": 0, "captures": 0, "copies_in": 0}

    def __call__(self, inputs: dict, length: int, epilogue=None) -> dict | None:
        """Outputs of one decode step (caches as views of the graph's buffers; `epilogue`'s outputs with them),
        or None where the plain program must run it: a state older than its buffer's newest (kv_cache copies then)
        or graphs disabled."""
        if self.disabled:
            return None
        ids = inputs["input_ids"]
        caches = {n: inputs[n] for n in self.cache_map if n not in self.states}
        key = (ids.shape[0], epilogue)
        bufs = self.buffers.get(key)
        own = bufs is not None and bufs.capacity > length and all(bufs.owns(c, n) for n, c in caches.items())
        if own and any(kv_cache.frontier(bufs.caches[n]) != bufs.rows(n, length) for n in caches):
            self.stats["plain_steps"] += 1
            return None
        try:
            if not own:
                bufs = self._place(key, caches, length)
            new_bufs = bufs.graph is None and self.capture
            out = bufs.step(ids, inputs["positions"], length, {n: inputs[n] for n in self.states})
            self.stats["captures"] += new_bufs
        except Exception as e:  # noqa: BLE001  (a failed capture must not lose the step: say so, run it plainly)
            return self._disable(e)
        self.stats["graph_steps"] += 1
        grown = {self.cache_map[n] for n in caches}
        result = {k: t.clone() for k, t in out.items() if k not in grown}   # next states too: fresh tensors
        for name in caches:
            result[self.cache_map[name]] = kv_cache.view(bufs.caches[name], bufs.rows(name, length + 1))
        return result

    def _place(self, key: tuple, caches: dict, length: int) -> _Buffers:
        """Buffers for key (batch, epilogue) that can hold `length + 1` rows, with the state's caches copied in."""
        bufs = self.buffers.pop(key, None)
        if bufs is None or bufs.capacity <= length or bufs.in_use():
            # none yet, outgrown, or someone still holds a view of it (keep theirs intact): start afresh
            if len(self.buffers) >= MAX_BATCH_SIZES:
                self.buffers.pop(next(iter(self.buffers)))
            bufs = _Buffers(self.program, key[0], capacity_for(length + 1, self.max_length), self.capture, key[1])
        self.buffers[key] = bufs
        for name, c in caches.items():
            bufs.caches[name][:, :bufs.rows(name, length)].copy_(c)
        self.stats["copies_in"] += 1
        return bufs

    def _disable(self, error: Exception) -> None:
        self.disabled = f"{type(error).__name__}: {error}"
        self.buffers.clear()
        msg = f"decode CUDA graphs disabled, steps run without them: {self.disabled}"
        if self.report is not None:
            self.report.notes.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return None
