"""The bench loop: every workload on every backend, same inputs, checked before timed.

Order of work. Eager always runs first (added if not asked for): its outputs are the
reference. Op workloads: for each shape, every backend compiles the workload graph
through its default passes, runs it on the same inputs, is compared with eager (a
result outside tolerance is WRONG and never timed) and then timed. Model workloads:
each backend compiles the model once, passes a small check (prefill logits and one
cached decode step against eager), then prefill rows (also compared with eager's
last logits at the timed shape) and decode rows (caches filled with random values
in the backend's own cache layout — absorbed MLA caches differ from naive ones) are
timed. Speculative (asked for with --op speculative, models with an MTP module): plain greedy generation and
MTP speculation from the same prompts, tokens required identical, both timed. A backend that cannot run is
listed once per row as "unavailable: reason".
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dsgraph import progress
from dsgraph.backends import get_backend, kv_cache
from dsgraph.errors import DeviceMemoryError, DSGraphError, UnknownOpError
from dsgraph.numerics import rel_err, tolerance
from dsgraph.runtime.memory import available_bytes

from .. import api
from ..api import compile_graph
from .roofline import floor_ms
from .timing import buffer_count, measure
from .workloads import (
    DECODE_SHAPED,
    MODEL_WORKLOADS,
    OP_WORKLOADS,
    Workload,
    applicable,
    build_op,
    inputs_nbytes,
    model_costs,
    random_inputs,
)

CHECK_TOKENS = 8    # prefill logits compared over the last positions (they attend to everything)
SPEC_TOKENS = 32    # tokens the generate / speculative workloads produce after the prompt
SPEC_REPEATS = 5    # a generation is long: fewer timed repeats than the per-step rows


@dataclass
class BenchConfig:
    model: str
    device: str
    dtype: str
    backends: list[str]
    workloads: list[str]
    batches: list[int]
    prefill_batches: list[int]
    contexts: list[int]
    repeats: int
    warmup: int
    seed: int = 0
    budget_s: float | None = None   # CPU: cap on the time spent timing one row


def op_shapes(cfg: BenchConfig, name: str):
    """The symbol bindings workload `name` is run at: decode-shaped ones over batch x context (T), the rest
    over prefill batch x context (S)."""
    batches = cfg.batches if name in DECODE_SHAPED else cfg.prefill_batches
    for b in batches:
        for c in cfg.contexts:
            yield {"B": b, "T": c} if name in DECODE_SHAPED else {"B": b, "S": c}


def parse_backend(spec: str) -> tuple[str, dict]:
    """"torch_compile:reduce-overhead" -> ("torch_compile", {"mode": "reduce-overhead"})."""
    name, _, mode = spec.partition(":")
    return name, ({"mode": mode} if mode else {})


def _short(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg if len(msg) <= 300 else msg[:297] + "..."


class Runner:
    def __init__(self, cfg: BenchConfig, model, peak: dict, log=None, on_row=None):
        self.cfg = cfg
        self.model = model
        self.peak = peak
        self.rows: list[dict] = []
        self.log = log or progress.write
        self.on_row = on_row  # called with the rows so far after each new row (partial JSON)
        self.progress = progress.bar(None, f"bench {cfg.model}", unit="row")
        self.backends = list(dict.fromkeys(["eager"] + cfg.backends))

    # helpers ---------------------------------------------------------------------
    def _row(self, w, backend: str, status: str, **extra) -> dict:
        fl, bound = floor_ms(w.flops, w.bytes, self.peak, "float8_e4m3fn" if w.name == "fp8_gemm" else self.cfg.dtype)
        row = {"workload": w.name, "level": w.level, "label": w.label, "batch": w.batch, "context": w.context,
               "shape": dict(w.env), "tokens": w.tokens, "backend": backend, "status": status, "error": None,
               "tolerance": tolerance(self.cfg.dtype, "op" if w.level == "op" else "model"), "reason": None,
               "median_ms": None, "p20_ms": None, "p80_ms": None, "min_ms": None, "repeats": None, "buffers": None,
               "timing_method": None, "throughput": None, "throughput_unit": "tokens/s", "flops": float(w.flops),
               "bytes": float(w.bytes), "floor_ms": fl, "bound": bound, "frac_of_floor": None, "speedup_vs_eager": None,
               "speedup_vs_torch_compile": None, "compile_s": None, "fallbacks": None, "ttft_ms": None,
               "notes": list(w.notes)}
        row.update(extra)
        self.rows.append(row)
        if self.on_row:
            self.on_row(self.rows)
        self.progress.update(1)
        tag = status if status != "ok" else f"{row['median_ms']:.3f} ms"
        self.log(f"  {backend:<28} {w.label:<36} {tag}" + (f"  ({row['reason']})" if row["reason"] else ""))
        return row

    def _timed(self, w, backend, fn, buffers, err, warmup=None, repeats=None, **extra) -> dict:
        t = measure(fn, buffers, self.cfg.device, warmup or self.cfg.warmup, repeats or self.cfg.repeats,
                    self.cfg.budget_s)
        return self._row(w, backend, "ok", error=err, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                         min_ms=t.min_ms, repeats=t.repeats, buffers=len(buffers), timing_method=t.method,
                         throughput=w.tokens / (t.median_ms * 1e-3), **extra)

    def _compare(self, outs: dict, refs: dict) -> float:
        worst = 0.0
        for name, ref in refs.items():
            out = outs[name]
            if name == "logits":
                out = out[:, -ref.shape[1]:]
            if not ref.is_floating_point():
                worst = max(worst, 0.0 if torch.equal(out.cpu(), ref.cpu()) else float("inf"))
            else:
                worst = max(worst, rel_err(out.float().to(ref.device), ref))
        return worst

    def _input_buffers(self, graph, w) -> list[dict]:
        """The input sets a row rotates through, made on the device. Sized from the graph's types first: a set
        that cannot fit 90 % of the free memory (a full-size model's decode caches at large B x T) is refused with
        the sizes before anything is allocated; more sets than one keep to half of what is free."""
        one = inputs_nbytes(graph, w.env)
        free = available_bytes(torch.device(self.cfg.device))
        if free is not None and one > 0.9 * free:
            raise DeviceMemoryError(
                f"{w.label}: one set of inputs (KV caches included) needs {one / 2**30:,.1f} GiB on "
                f"{self.cfg.device}, but {free / 2**30:,.1f} GiB is free; use a smaller --batch or --context")
        n_buf = buffer_count(one, self.cfg.device)
        if free is not None:
            n_buf = max(1, min(n_buf, free // 2 // max(one, 1)))
        vocab = self.model.config.vocab_size
        return [random_inputs(graph, w.env, self.cfg.seed + i, vocab, self.cfg.device) for i in range(n_buf)]

    def _unavailable(self, spec: str) -> tuple[str, str] | None:
        """None if `spec` can run here; else its rows' (status, reason): "failed" for a backend that does not
        exist (a typo is the user's error, not this machine's), "unavailable" for one this machine lacks."""
        try:
            be = get_backend(parse_backend(spec)[0])
        except UnknownOpError as e:
            return "failed", str(e)
        try:
            reason = be.available(self.cfg.device)
        except Exception as e:  # an unimportable backend is reported, not fatal
            reason = str(e)
        return ("unavailable", reason) if reason else None

    # op level --------------------------------------------------------------------
    def op_shapes(self, name: str):
        return op_shapes(self.cfg, name)

    def run_op(self, name: str) -> None:
        mc = self.model.config
        why = applicable(name, mc)
        if why:
            self.log(f"skip {name}: {why}")
            return
        for env in self.op_shapes(name):
            w = build_op(name, mc, self.cfg.dtype, env, self.cfg.seed, self.cfg.device)
            try:
                buffers = self._input_buffers(w.graph, w)
            except DeviceMemoryError as e:
                for spec in self.backends:
                    self._row(w, spec, "failed", reason=_short(e))
                continue
            refs = None
            for spec in self.backends:
                refs = self._op_backend(w, spec, buffers, refs)
            del buffers, refs
            if str(self.cfg.device).startswith("cuda"):
                torch.cuda.empty_cache()

    def _op_backend(self, w, spec, buffers, refs):
        skip = self._unavailable(spec)
        if skip:
            self._row(w, spec, skip[0], reason=skip[1])
            return refs
        if refs is None and spec != "eager":
            self._row(w, spec, "failed", reason="not checked, so not timed: eager failed on this workload")
            return refs
        name, options = parse_backend(spec)
        try:
            be = get_backend(name)
            t0 = time.perf_counter()
            graph, weights, _ = compile_graph(w.graph, w.weights, be, "default", True, None)
            compiled = be.compile(graph, weights, device=self.cfg.device, dtype=self.cfg.dtype, **options)
            outs = compiled.run(buffers[0])
            compile_s = time.perf_counter() - t0
        except Exception as e:
            self._row(w, spec, "failed", reason=_short(e))
            return refs if spec != "eager" else None
        tol = tolerance(self.cfg.dtype, report=compiled.report)
        meta = {"compile_s": compile_s, "fallbacks": len(compiled.report.fallbacks), "tolerance": tol}
        if spec == "eager":
            refs = {k: v.detach() for k, v in outs.items()}
            err = 0.0
        else:
            err = self._compare(outs, refs)
            if not err <= tol:
                self._row(w, spec, "WRONG", error=err, reason=f"rel err {err:.2e} vs eager exceeds tolerance", **meta)
                return refs
        del outs
        self._timed(w, spec, compiled.run, buffers, err, **meta)
        return refs

    # model level -------------------------------------------------------------------
    def model_workloads(self):
        mc, summary = self.model.config, self.model.graph.summary()
        wanted = [n for n in MODEL_WORKLOADS if n in self.cfg.workloads]
        for name in wanted:
            for env in self.op_shapes(name):
                env = {"B": env["B"], "S": 1, "T": env["T"]} if name == "decode" else env
                flops, nbytes = model_costs(mc, summary, name, env)
                yield _ModelWorkload(name, "model", env, env["B"] * env["S"], flops, nbytes)

    def run_models(self) -> None:
        work = list(self.model_workloads())
        if not work:
            return
        self.log(f"model {self.cfg.model}: {', '.join(w.label for w in work)}")
        refs: dict = {}
        for spec in self.backends:
            if spec != "eager" and "small" not in refs:
                for w in work:
                    self._row(w, spec, "failed", reason="not checked, so not timed: eager failed on the model")
                continue
            self._model_backend(spec, work, refs)

    def _model_backend(self, spec, work, refs) -> None:
        skip = self._unavailable(spec)
        if skip:
            for w in work:
                self._row(w, spec, skip[0], reason=skip[1])
            return
        name, options = parse_backend(spec)
        self.log(f"compiling {self.cfg.model} for {spec}")
        try:
            t0 = time.perf_counter()
            exe = api.compile(self.model, backend=name, device=self.cfg.device, dtype=self.cfg.dtype, **options)
            compile_s = time.perf_counter() - t0
            small = self._small_check(exe)
        except Exception as e:
            for w in work:
                self._row(w, spec, "failed", reason=_short(e))
            return
        tol = tolerance(self.cfg.dtype, "model", exe.compiled.report)
        meta = {"compile_s": compile_s, "fallbacks": len(exe.compiled.report.fallbacks), "tolerance": tol}
        if spec == "eager":
            refs["small"] = small
        else:
            err = max(rel_err(a.cpu(), b.cpu()) for a, b in zip(small, refs["small"]))
            if not err <= tol:
                for w in work:
                    self._row(w, spec, "WRONG", error=err, reason=f"model check: rel err {err:.2e} vs eager", **meta)
                return
        for w in work:
            try:
                self._model_row(exe, spec, w, refs, meta)
            except Exception as e:
                self._row(w, spec, "failed", reason=_short(e), **meta)
        del exe
        if str(self.cfg.device).startswith("cuda"):
            torch.cuda.empty_cache()

    def _small_check(self, exe):
        """Prefill logits of a [2, 8] prompt and one cached decode step (the check `dsgraph check` does)."""
        ids = torch.randint(0, self.model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits, state = exe.prefill(ids)
            dec, _ = exe.decode(logits[:, -1:].argmax(-1), state)
        return logits.float().cpu(), dec.float().cpu()

    def _model_row(self, exe, spec, w, refs, meta):
        tol = meta["tolerance"]
        buffers = self._input_buffers(exe.graph, w)
        run = exe.compiled.run
        if w.name == "prefill":
            def step(inputs):
                return run(inputs)["logits"][:, -1].argmax(-1)   # time to first token: prefill + pick
            with torch.no_grad():
                logits = run(buffers[0])["logits"][:, -CHECK_TOKENS:].float()
            key, err = ("prefill", w.label), 0.0
            if spec == "eager":
                refs[key] = logits
            elif key in refs:
                err = rel_err(logits.to(refs[key].device), refs[key])
                if not err <= tol:
                    self._row(w, spec, "WRONG", error=err, reason=f"prefill logits rel err {err:.2e} vs eager",
                              **meta)
                    return
            del logits
            with torch.no_grad():
                row = self._timed(w, spec, step, buffers, err, **meta)
            row["ttft_ms"] = row["median_ms"]
            return
        notes = ["decode over random caches in this backend's own layout; correctness from the model check"]
        names = [n for n, v in exe.graph.inputs.items() if v.kind == "cache"]
        graphed = exe.compiled.decode_step
        with torch.no_grad():  # copy the random caches into the graph's buffers and capture, once
            first = graphed(buffers[0], w.env["T"]) if graphed is not None else None
        if first is not None:
            views = {n: first[exe.graph.cache_map[n]][:, :w.env["T"]] for n in names}
            buffers = [{**b, **views} for b in buffers]
            del first

            def run(inputs, _t=w.env["T"]):
                out = graphed({**inputs, **{n: kv_cache.rewind(inputs[n]) for n in names}}, _t)
                if out is None:
                    raise DSGraphError("the decode graph declined the step "
                                      f"({getattr(graphed, 'disabled', None) or 'an older state'})")
                return out
            notes.append("one-token step replayed from a CUDA graph (caches at static capacity), as generate "
                         "runs it")
        elif getattr(get_backend(parse_backend(spec)[0]), "grows_caches_in_place", False):
            # as generate's steps see them: caches in buffers with room, each call appending in place
            buffers = [{**b, **{n: kv_cache.reserve(b[n], w.env["S"]) for n in names}} for b in buffers]

            def run(inputs, _run=run):
                return _run({**inputs, **{n: kv_cache.rewind(inputs[n]) for n in names}})
            notes.append("caches grow in place: each call appends into spare capacity, as in generate")
        with torch.no_grad():
            self._timed(w, spec, run, buffers, None, **meta)
        self.rows[-1]["notes"].extend(notes)


    # speculative decoding -------------------------------------------------------------
    def run_speculative(self, load_model) -> None:
        """Plain greedy generation and MTP speculation from the same prompts on every backend: the tokens must
        be identical (speculation is lossless) before both are timed; the speculative row carries the
        acceptance per draft position, tokens per main-model step and the speedup over plain decoding."""
        why = applicable("speculative", self.model.config)
        if why:
            self.log(f"skip speculative: {why}")
            return
        mc, summary = self.model.config, self.model.graph.summary()
        work = []
        for b in self.cfg.batches:
            for c in self.cfg.contexts:
                env = {"B": b, "S": c}
                f0, b0 = model_costs(mc, summary, "prefill", env)
                f1, b1 = model_costs(mc, summary, "decode", {"B": b, "S": 1, "T": c + SPEC_TOKENS // 2})
                cost = (f0 + SPEC_TOKENS * f1, b0 + SPEC_TOKENS * b1)
                work.append(tuple(_ModelWorkload(n, "model", env, b * SPEC_TOKENS, *cost, new_tokens=SPEC_TOKENS)
                                  for n in ("generate", "speculative")))
        if not work:
            return
        model = load_model()
        self.log(f"speculative {self.cfg.model}: {', '.join(w.label for pair in work for w in pair)}")
        for spec in self.backends:
            self._speculative_backend(spec, model, work)

    def _speculative_backend(self, spec, model, work) -> None:
        skip = self._unavailable(spec)
        rows = [w for pair in work for w in pair]
        if skip:
            for w in rows:
                self._row(w, spec, skip[0], reason=skip[1])
            return
        name, options = parse_backend(spec)
        try:
            t0 = time.perf_counter()
            exe = api.compile(model, backend=name, device=self.cfg.device, dtype=self.cfg.dtype, keep_mtp=True,
                                  **options)
            meta = {"compile_s": time.perf_counter() - t0, "fallbacks": len(exe.compiled.report.fallbacks)}
        except Exception as e:
            for w in rows:
                self._row(w, spec, "failed", reason=_short(e))
            return
        timing = {"warmup": 1, "repeats": min(self.cfg.repeats, SPEC_REPEATS)}
        for plain_w, spec_w in work:
            plain = None
            try:
                buffers = [{"ids": torch.randint(0, model.config.vocab_size, (plain_w.env["B"], plain_w.env["S"]),
                                                 generator=torch.Generator().manual_seed(self.cfg.seed + i))}
                           for i in range(2)]
                with torch.no_grad():
                    ref = exe.generate(buffers[0]["ids"], SPEC_TOKENS)
                    out, stats = exe.generate(buffers[0]["ids"], SPEC_TOKENS, speculative="mtp", return_stats=True)
                    plain = self._timed(plain_w, spec, lambda b: exe.generate(b["ids"], SPEC_TOKENS), buffers, None,
                                        **timing, **meta)
                    if not torch.equal(out.cpu(), ref.cpu()):
                        self._row(spec_w, spec, "WRONG", reason="speculative tokens differ from plain greedy", **meta)
                        continue
                    row = self._timed(spec_w, spec, lambda b: exe.generate(b["ids"], SPEC_TOKENS, speculative="mtp"),
                                      buffers, None, **timing, **meta)
            except Exception as e:
                for w in (plain_w, spec_w) if plain is None else (spec_w,):
                    self._row(w, spec, "failed", reason=_short(e), **meta)
                continue
            acc = stats.extra["acceptance_per_position"]
            row["speculation"] = {"acceptance_per_position": acc,
                                  "tokens_per_main_step": stats.extra["mean_tokens_per_target_step"],
                                  "speedup_vs_plain": plain["median_ms"] / row["median_ms"]}
            row["notes"].append(f"acceptance {', '.join(f'{a:.2f}' for a in acc)}; "
                                f"{stats.extra['mean_tokens_per_target_step']:.2f} tokens per main step; "
                                f"{row['speculation']['speedup_vs_plain']:.2f}x plain decoding")
            self.log(f"    {row['notes'][-1]}")
        if str(self.cfg.device).startswith("cuda"):
            torch.cuda.empty_cache()


@dataclass
class _ModelWorkload(Workload):
    new_tokens: int = 0             # generate / speculative: tokens generated after the S-token prompt

    @property
    def context(self) -> int:
        return self.env["T"] if self.name == "decode" else self.env["S"]

    @property
    def label(self) -> str:
        return f"{self.name} B={self.env['B']} " + (f"T={self.env['T']}" if self.name == "decode"
                                                     else f"S={self.env['S']}") + \
            (f" N={self.new_tokens}" if self.new_tokens else "")


def sort_rows(rows: list[dict], backends: list[str]) -> list[dict]:
    """Op rows before model rows, each workload shape together, backends in the order asked."""
    first = {}
    for r in rows:
        first.setdefault((r["level"] == "model", r["label"]), len(first))
    order = {b: i for i, b in enumerate(backends)}
    return sorted(rows, key=lambda r: (r["level"] == "model", first[(r["level"] == "model", r["label"])],
                                       order.get(r["backend"], len(order))))


def add_speedups(rows: list[dict]) -> None:
    """Fill speedup_vs_eager / _vs_torch_compile and frac_of_floor for timed rows."""
    base: dict = {}
    for r in rows:
        if r["status"] == "ok" and r["backend"] in ("eager", "torch_compile"):
            base[(r["label"], r["backend"])] = r["median_ms"]
    for r in rows:
        if r["status"] != "ok":
            continue
        r["frac_of_floor"] = r["floor_ms"] / r["median_ms"] if r["median_ms"] else None
        for ref, key in (("eager", "speedup_vs_eager"), ("torch_compile", "speedup_vs_torch_compile")):
            t = base.get((r["label"], ref))
            r[key] = t / r["median_ms"] if t and r["median_ms"] else None


def run_bench(cfg: BenchConfig, model, peak: dict, log=None, load_mtp_model=None, on_row=None) -> list[dict]:
    """`load_mtp_model()` gives the model with its MTP branch, for the speculative workload; `on_row(rows)` is
    called after every row."""
    runner = Runner(cfg, model, peak, log, on_row)
    with runner.progress:
        for name in cfg.workloads:
            if name in OP_WORKLOADS:
                runner.run_op(name)
        runner.run_models()
        if "speculative" in cfg.workloads:
            runner.run_speculative(load_mtp_model)
    add_speedups(runner.rows)
    return sort_rows(runner.rows, runner.backends)
