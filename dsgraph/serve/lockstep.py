"""One engine over the ranks of a sharded model (`torchrun ... dsgraph serve --tp/--ep`): rank 0 serves, every
rank steps an identical Engine replica together.

Each rank's graph is its shard, and its collectives need every rank in the same call with the same batch, so the
replicas must schedule identically. Rank 0's `LockstepEngine` records what changes its engine between steps
(requests queued, requests aborted) and, before each step, broadcasts the list over a gloo group (CPU objects;
NCCL stays for the model's collectives) followed by "step"; the other ranks (`follow`) apply the same changes in
the same order and step. What could differ between ranks is decided on rank 0 and sent: the prompt travels as
token ids (a chat template is rendered once), and a sampled request without a seed gets one drawn on rank 0.
Sampling then agrees: every rank's logits are the same tensor after the graph's final collective, and each
row's uniforms come from its seed alone (runtime/sampling.py). The engine has nothing time-based (no max_time).

Each message also carries rank 0's view of the batch about to run ((tokens, last token) per request); a follower
whose engine disagrees raises RankDivergence instead of issuing collectives of another shape. While the server
is idle a heartbeat message (no step) keeps the followers' wait under gloo's timeout. `close()` sends "stop":
the followers' `follow` returns and every rank leaves the process group.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import replace

import torch.distributed as tdist

from dsgraph.errors import RankDivergence

from .engine import Engine, NewRequest

SEED_BITS = 42          # a seed drawn on rank 0 for a request without one (any int is a seed; 42 bits are plenty)
HEARTBEAT_S = 60.0       # an idle server pings its followers this often (gloo's default timeout is 30 minutes)


class LockstepEngine(Engine):
    """An Engine whose every step is mirrored by the engines of the other ranks (rank 0 builds this one; the
    others build theirs with the same arguments and call `follow`). All ranks must construct it together: it
    creates a process group."""

    def __init__(self, exe, *args, heartbeat_s: float = HEARTBEAT_S, **kwargs):
        super().__init__(exe, *args, **kwargs)
        self.group = tdist.new_group(backend="gloo")
        self.rank = tdist.get_rank()
        self._changes: list[tuple] = []
        self._sent = time.monotonic()
        self._closed = threading.Event()
        self._heartbeat_s = heartbeat_s

    # rank 0 --------------------------------------------------------------------------------
    def new_request(self, prompt, max_tokens: int | None = 16, **options) -> NewRequest:
        """A sampled request without a seed gets one here, so that every rank draws the same numbers."""
        new = super().new_request(prompt, max_tokens, **options)
        if not new.params.greedy and new.params.seed is None:
            new = replace(new, params=replace(new.params, seed=secrets.randbits(SEED_BITS)))
        return new

    def enqueue(self, new: NewRequest) -> str:
        with self._lock:
            rid = super().enqueue(new)
            self._changes.append(("add", new))
        return rid

    def abort(self, request_id: str) -> bool:
        with self._lock:
            done = super().abort(request_id)
            if done:
                self._changes.append(("abort", request_id))
        return done

    def step(self, launched=None):
        with self._lock:
            self._send("step")
            return super().step(launched)

    def start_heartbeat(self) -> None:
        threading.Thread(target=self._beat, name="dsgraph-lockstep-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._closed.wait(self._heartbeat_s / 4):
            with self._lock:
                if not self._closed.is_set() and time.monotonic() - self._sent >= self._heartbeat_s:
                    self._send(None)

    def close(self) -> None:
        """Tell the followers to stop (rank 0, once the server has stopped stepping)."""
        with self._lock:
            if not self._closed.is_set():
                self._closed.set()
                self._send("stop")

    def _send(self, then: str | None) -> None:
        message = [(self._changes, self._batch(), then)]
        self._changes = []
        tdist.broadcast_object_list(message, src=0, group=self.group)
        self._sent = time.monotonic()

    def _batch(self) -> list[tuple[str, int, int]]:
        return [(s.rid, len(s.row.tokens), s.row.tokens[-1] if s.row.tokens else -1)
                for s in self.waiting + self.running]

    # the other ranks -----------------------------------------------------------------------
    def follow(self) -> None:
        """Mirror rank 0's engine until it says stop. A step that fails here fails on rank 0 too (the same
        inputs), which reports it to its clients and aborts its requests: the abort arrives with the next
        message."""
        steps = 0
        while True:
            message = [None]
            tdist.broadcast_object_list(message, src=0, group=self.group)
            changes, batch, then = message[0]
            for kind, what in changes:
                if kind == "add":
                    Engine.enqueue(self, what)
                else:
                    Engine.abort(self, what)
            if then == "stop":
                return
            if self._batch() != batch:
                raise RankDivergence(f"rank {self.rank}'s engine differs from rank 0's before step {steps}: "
                                     f"(request, tokens made, last token) {self._batch()} here, {batch} on rank 0; "
                                     "the ranks' logits or sampling disagreed, or a step failed on one rank only "
                                     "(docs/distributed.md, Serving)")
            if then == "step":
                steps += 1
                try:
                    Engine.step(self)
                except Exception:  # noqa: BLE001  (rank 0 fails the same step and reports it)
                    pass
