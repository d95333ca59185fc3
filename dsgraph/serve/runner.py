"""The engine stepping in a background thread for an asyncio server, and the Prometheus metrics it keeps.

HTTP handlers `submit` requests with an asyncio queue; the thread steps the engine while any request is in it
and hands a step's RequestOutputs to their queues in one call_soon_threadsafe per event loop (one wake-up of the
loop a step, not one per request), once the next step is on the device (the loop's work on them, streaming
chunks, then runs during device time instead of delaying the next step's launch; with nothing left to run they
go at once). A step that raises fails the requests in it (the queue gets the exception) and the engine goes on.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """dsgraph_* series in a registry of their own (several servers in one process do not collide)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dsgraph_requests", "finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("dsgraph_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("dsgraph_generation_tokens", "tokens generated", registry=r)
        self.running = Gauge("dsgraph_num_requests_running", "requests in the running batch", registry=r)
        self.waiting = Gauge("dsgraph_num_requests_waiting", "requests waiting for a seat or blocks", registry=r)
        self.blocks = Gauge("dsgraph_kv_blocks_used", "KV-cache blocks held by requests", registry=r)
        self.preemptions = Gauge("dsgraph_preemptions", "requests preempted by recompute so far", registry=r)
        self.ttft = Histogram("dsgraph_time_to_first_token_seconds", "arrival to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("dsgraph_inter_token_seconds", "time between output tokens", buckets=_LATENCY,
                              registry=r)
        self.e2e = Histogram("dsgraph_e2e_request_latency_seconds", "arrival to finish", buckets=_LATENCY,
                             registry=r)

    def observe_engine(self, engine) -> None:
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        self.blocks.set(engine.pool.used)
        self.preemptions.set(engine.preemptions)


class _Sub:
    def __init__(self, loop, queue):
        self.loop, self.queue = loop, queue
        self.t0 = self.last = time.perf_counter()
        self.first = True


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class Runner:
    """Owns the engine's thread; every engine call of the server goes through here."""

    def __init__(self, engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self.subs: dict[str, _Sub] = {}
        self.lock = threading.Lock()   # guards `subs`; never held while calling the engine (see abort)
        self.wake = threading.Event()
        self.stopping = False
        self._held: list = []        # the last step's outputs, handed over once the next step is launched
        self.thread = threading.Thread(target=self._loop, name="dsgraph-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, prompt, queue: asyncio.Queue, sample: int, options: dict) -> str:
        """Queue one request whose outputs go to `queue`; an InputError (bad prompt, too long) propagates."""
        rid = uuid.uuid4().hex
        with self.lock:
            self.subs[rid] = _Sub(asyncio.get_running_loop(), queue)
        try:
            self.engine.add_request(prompt, request_id=rid, sample=sample, detokenize=True, **options)
        except Exception:
            with self.lock:
                del self.subs[rid]
            raise
        self.wake.set()
        return rid

    def abort(self, rid: str) -> None:
        with self.lock:     # never held while calling the engine: a step holds the engine's lock and delivers
            sub = self.subs.pop(rid, None)
        if sub is not None and self.engine.abort(rid):
            self.metrics.requests.labels("abort").inc()
        self.metrics.observe_engine(self.engine)

    def _loop(self) -> None:
        while not self.stopping:
            if not self.engine.has_unfinished():
                self._flush()
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            try:
                outs = self.engine.step(launched=self._flush)
                self._held += outs
            except Exception as e:       # the requests of this step fail; the server stays up
                self._flush()
                self._fail_all(e)
                continue
            self.metrics.observe_engine(self.engine)
        self._flush()

    def _flush(self) -> None:
        held, self._held = self._held, []
        if held:
            with self.lock:
                self._deliver(held)

    def _deliver(self, outs: list) -> None:
        """One step's outputs to their subscribers' queues (and the metrics), one hand-over per event loop."""
        now, m, by_loop = time.perf_counter(), self.metrics, {}
        made = 0
        for o in outs:
            sub = self.subs.get(o.request_id)
            if sub is None:
                continue
            if o.new_token_ids:
                if sub.first:
                    m.ttft.observe(now - sub.t0)
                else:      # a step makes at most one token per request
                    m.tpot.observe(now - sub.last)
                made += len(o.new_token_ids)
                sub.first, sub.last = False, now
            if o.finished:
                del self.subs[o.request_id]
                m.requests.labels(o.finish_reason).inc()
                m.prompt_tokens.inc(o.prompt_tokens)
                m.e2e.observe(now - sub.t0)
            by_loop.setdefault(sub.loop, []).append((sub.queue, o))
        m.generation_tokens.inc(made)
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _fail_all(self, error: Exception) -> None:
        with self.lock:
            subs, self.subs = self.subs, {}
        for rid, sub in subs.items():
            self.engine.abort(rid)
            sub.loop.call_soon_threadsafe(sub.queue.put_nowait, error)

    def shutdown(self, timeout: float) -> None:
        """Let running requests finish for up to `timeout` seconds, abort the rest, stop the thread."""
        end = time.monotonic() + timeout
        while (self.engine.has_unfinished() or self._held) and time.monotonic() < end:
            time.sleep(0.02)
        self._fail_all(RuntimeError("the server is shutting down"))
        self.stopping = True
        self.thread.join(timeout=5)
