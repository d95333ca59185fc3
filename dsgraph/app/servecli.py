"""`dsgraph serve MODEL|ARTIFACT`: the OpenAI-compatible server (dsgraph/serve/http.py) on uvicorn.

uvicorn handles SIGTERM / Ctrl-C gracefully: it stops accepting, the app's shutdown lets running requests
finish for --shutdown-timeout seconds, aborts the rest and the process exits 0.

Under torchrun with --tp / --ep every rank loads its shard; rank 0 serves and steps a LockstepEngine, the others
mirror it (dsgraph/serve/lockstep.py), print nothing and ignore SIGTERM / SIGINT: they stop when rank 0 does.
"""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from dsgraph.errors import BackendUnavailable, ConfigError
from dsgraph.parallel import ParallelPlan
from dsgraph.runtime import distributed
from dsgraph.serve.engine import Engine
from dsgraph.serve.lockstep import LockstepEngine

from . import api
from . import cli_guard as guard
from .textcli import load_options, log


def add_parser(sub, common) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                       description="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                       "/v1/models, /health, /metrics) with continuous batching over a paged KV cache",
                       parents=[common], allow_abbrev=False)
    s.add_argument("model", help="preset name, HF checkpoint dir, saved graph or compiled artifact dir")
    s.add_argument("--backend", default=None, help="default eager; an artifact runs on its own backend")
    s.add_argument("--device", default=None, help="cpu or cuda (default: the artifact's, else cuda if present)")
    s.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    s.add_argument("--keep-fp8", action="store_true", help="keep an FP8 checkpoint's e4m3 weights (FP8 GEMMs)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=guard.int_at_least(0), default=8000)
    s.add_argument("--served-model-name", default=None, help="the model id clients name (default: MODEL)")
    s.add_argument("--api-key", default=os.environ.get("DSGRAPH_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $DSGRAPH_API_KEY; none: no auth)")
    s.add_argument("--max-num-seqs", type=guard.int_at_least(1), default=16, help="requests in the running batch")
    s.add_argument("--max-num-batched-tokens", type=guard.int_at_least(1), default=512,
                   help="tokens computed per engine step (prefill chunks + decode tokens)")
    s.add_argument("--block-size", type=guard.int_at_least(1), default=16, help="tokens per KV-cache block")
    s.add_argument("--num-blocks", type=guard.int_at_least(1), default=None,
                   help="KV-cache blocks (default: max-num-seqs full-length sequences)")
    s.add_argument("--no-prefix-caching", action="store_true", help="do not share full prompt blocks")
    s.add_argument("--max-waiting", type=guard.int_at_least(1), default=256,
                   help="queued requests beyond which new ones get 429")
    s.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds running requests get on SIGTERM")
    s.add_argument("--tp", type=guard.int_at_least(1), default=1, help="tensor-parallel ranks (run under torchrun)")
    s.add_argument("--ep", type=guard.int_at_least(1), default=1, help="expert-parallel ranks (run under torchrun)")
    s.add_argument("--dp-attention", action="store_true",
                   help="attention data-parallel per rank, MoE expert-parallel with all_to_all (every rank steps "
                        "the same batch: rank 0's)")
    s.set_defaults(fn=cmd_serve)


def load_engine(args, plan: ParallelPlan | None = None) -> Engine:
    """The engine over an artifact or a model compiled now; with `plan`, this rank's shard in a LockstepEngine
    (every rank builds one, together)."""
    if (Path(args.model) / "manifest.json").exists():
        if plan is not None:
            raise ConfigError(f"{args.model} is a compiled artifact of one process; --tp/--ep shard a model: "
                              "give a preset or checkpoint")
        exe = api.load_artifact(args.model, device=args.device, backend=args.backend)
    else:
        exe = api.compile(api.load(args.model, dtype=args.dtype, **load_options(args)),
                          backend=args.backend or "eager", device=args.device, dtype=args.dtype, parallel=plan)
    return (Engine if plan is None else LockstepEngine)(
        exe, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, num_blocks=args.num_blocks, prefix_caching=not args.no_prefix_caching)


def cmd_serve(args) -> int:
    try:
        import uvicorn  # the serve extra (fastapi, uvicorn, prometheus-client), loaded only to serve

        from dsgraph.serve.http import create_app  # imports fastapi and prometheus_client at its top
    except ImportError as e:
        raise BackendUnavailable(f"dsgraph serve needs the serve extra ({e.name} is missing): "
                                 "pip install 'dsgraph[serve]'") from None
    if args.tp == 1 and args.ep == 1 and not args.dp_attention:
        return _serve(args, load_engine(args), uvicorn, create_app)
    plan = ParallelPlan(tp=args.tp, ep=args.ep, dp_attention=args.dp_attention)
    rank, _ = distributed.init(api.resolve_device(args.device))
    if rank != 0:
        return _follow(args, plan)
    engine = load_engine(args, plan)
    log.info(engine.exe.compiled.report.notes[-1])
    engine.start_heartbeat()
    try:
        return _serve(args, engine, uvicorn, create_app)
    finally:
        engine.close()


def _follow(args, plan: ParallelPlan) -> int:
    """A rank other than 0: its shard's engine mirrors rank 0's until rank 0 stops (an error still reaches
    stderr: it propagates past the redirect)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        load_engine(args, plan).follow()
    return 0


def _serve(args, engine: Engine, uvicorn, create_app) -> int:
    name = args.served_model_name or args.model
    app = create_app(engine, name, api_key=args.api_key, max_waiting=args.max_waiting,
                     shutdown_timeout=args.shutdown_timeout)
    log.info(f"serving {name} ({engine.exe.compiled.report.backend} on {engine.exe.device}) at "
             f"http://{args.host}:{args.port}/v1")
    log.info(f"decode: {engine.decode_path}")
    _server(uvicorn)(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                    timeout_graceful_shutdown=30)).run()
    return 0


def _server(uvicorn):
    """uvicorn's Server, except that SIGTERM / SIGINT end a graceful shutdown with exit 0 (uvicorn re-raises the
    signal after shutting down, which kills the process with it)."""
    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
    return Server
