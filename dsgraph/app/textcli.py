"""The text side of the command line: `dsgraph run --prompt`, `dsgraph chat`, `dsgraph list`, and logging.

Text streams to stdout as it is generated; the stats line (`[eos after 23 tokens] ttft 41 ms, 92.3 tok/s`)
and the log (the `dsgraph` logger, -v for debug, -q for errors only) go to stderr, so stdout holds only text.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from dsgraph import models
from dsgraph import passes as passlib
from dsgraph.backends import available_backends, backend_names
from dsgraph.errors import InputError

try:
    import readline  # noqa: F401  (line editing and history for chat's input(), where the platform has it)
except ImportError:
    pass

log = logging.getLogger("dsgraph")
LISTS = ("presets", "backends", "passes")


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record comes (tests and embedders swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def configure_logging(verbose: int = 0, quiet: bool = False) -> None:
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(level)


def add_logging_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="log errors only")


def add_sampling_args(s: argparse.ArgumentParser) -> None:
    """Text and sampling options of `run` and `chat`; unset knobs fall back to generation_config.json."""
    s.add_argument("--chat", action="store_true", help="wrap --prompt as a user message in the chat template")
    s.add_argument("--system", default=None, help="a system message (implies --chat)")
    s.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: generation_config)")
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--min-p", type=float, default=None)
    s.add_argument("--repetition-penalty", type=float, default=None)
    s.add_argument("--seed", type=int, default=None, help="same seed, same text (same backend and device)")
    s.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    s.add_argument("--max-time", type=float, default=None, metavar="SECONDS", help="stop after this long")


def load_options(args) -> dict:
    return {"keep_fp8": True} if getattr(args, "keep_fp8", False) else {}


def sampling_options(args) -> dict:
    knobs = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
             "repetition_penalty": args.repetition_penalty, "seed": args.seed, "max_time": args.max_time}
    return {**{k: v for k, v in knobs.items() if v is not None}, "stop": args.stop or ()}


def stats_line(out) -> str:
    rate = f"{out.decode_tokens_per_s:.1f} tok/s" if out.decode_tokens_per_s == out.decode_tokens_per_s else "-"
    return (f"[{out.finish_reason} after {out.completion_tokens} tokens] "
            f"ttft {out.time_to_first_token_s * 1e3:.0f} ms, {rate}")


def stream(exe, prompt, images, args):
    """Generate, printing text as it comes; the stats line goes to stderr. `images`: generate's image keywords
    (empty for a text-only model)."""
    spec = {"speculative": args.speculative, "draft_depth": args.draft_depth} if getattr(args, "speculative", None) \
        else {}
    out = exe.generate(prompt, max_new_tokens=args.max_new_tokens, **sampling_options(args), **spec, **images,
                       on_text=lambda _, piece: print(piece, end="", flush=True))
    print(flush=True)
    print(stats_line(out), file=sys.stderr, flush=True)
    return out


def text_prompt(args):
    """`run`'s text prompt: the string, or with --chat/--system the messages; None for a token-id run."""
    if args.prompt is None:
        if args.chat or args.system is not None or args.stop:
            raise InputError("--chat, --system and --stop take a text --prompt (`dsgraph chat MODEL` is interactive)")
        return None
    if not (args.chat or args.system is not None):
        return args.prompt
    return ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]


def chat_loop(exe, args) -> int:
    """Multi-turn chat through the checkpoint's template: /reset forgets the conversation, /exit (or EOF) ends."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print("dsgraph chat: /reset starts over, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = list(system)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        out = stream(exe, messages, {}, args)
        messages.append({"role": "assistant", "content": out.text})


def cmd_list(args) -> int:
    if args.what == "presets":
        rows = [(n, "tiny" if n in models.TINY_PRESETS else "") for n in sorted(models.PRESETS)]
    elif args.what == "backends":
        here = {d: set(available_backends(d)) for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available()}
        rows = [(n, ", ".join(d for d in here if n in here[d]) or "unavailable here") for n in backend_names()]
    else:
        rows = sorted(passlib.list_passes().items())
    width = max(len(n) for n, _ in rows)
    for name, note in rows:
        print(f"{name:<{width}}  {note}".rstrip())
    return 0
