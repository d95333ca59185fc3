"""How the command line meets bad input: argument types, output paths checked before any work, and one line per
error instead of a traceback.

Exit codes: 0 success, 1 a result that is not ok (a failed check, WRONG bench rows, an unknown bench backend) or
an internal error, 2 a user error (a `DSGraphError`, an OS error on a path, a bad argument). `-v` / `--debug`
anywhere on the line shows the traceback as well.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from pathlib import Path

from dsgraph.backends import get_backend
from dsgraph.errors import DSGraphError, UnknownOpError

DEBUG_FLAGS = ("--debug",)  # -v (more logging, textcli.py) shows tracebacks too
USER_ERROR = 2

# argparse destinations naming an output: "file" (its directory must exist), "dir" (created with its parents)
OUTPUTS = {"json": "file", "plot": "file", "onnx": "file", "output": "dir", "emit_dir": "dir", "prebuild": "dir"}


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """argv without the debug flags (accepted anywhere on the line), and whether one was given."""
    return [a for a in argv if a not in DEBUG_FLAGS], any(a in DEBUG_FLAGS for a in argv)


def int_at_least(least: int):
    """An argparse type: an integer >= `least`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
        return value
    parse.__name__ = f"integer >= {least}"
    return parse


def token_ids(text: str) -> list[int]:
    """An argparse type: non-negative token ids separated by commas and/or spaces, at least one."""
    try:
        ids = [int(t) for t in re.split(r"[\s,]+", text) if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty; give at least one token id, e.g. 1,2,3")
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"--prompt-ids holds a negative token id: {text!r}")
    return ids


def unknown_backends(specs: list[str]) -> list[str]:
    """The backend specs (`name` or `name:mode`) that name no registered backend."""
    out = []
    for spec in specs:
        try:
            get_backend(spec.partition(":")[0])
        except UnknownOpError:
            out.append(spec)
    return [s for s in out if s]


def _writable_dir(d: Path) -> bool:
    return d.is_dir() and os.access(d, os.W_OK | os.X_OK)


def check_output(path: str, kind: str, flag: str) -> None:
    """Refuse an output path that cannot be written, before any work is done (a compile or bench run)."""
    p = Path(path)
    if kind == "file":
        if p.is_dir():
            raise argparse.ArgumentTypeError(f"{flag} {path}: is a directory; give a file name")
        if not _writable_dir(p.parent if str(p.parent) else Path(".")):
            raise argparse.ArgumentTypeError(f"{flag} {path}: directory {p.parent} does not exist or is not "
                                             "writable; create it or choose another path")
        return
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{flag} {path}: exists and is not a directory")
    ancestor = p
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not _writable_dir(p if p.exists() else ancestor):
        raise argparse.ArgumentTypeError(f"{flag} {path}: {ancestor} is not a writable directory; choose another "
                                         "path")


def check_outputs(args) -> None:
    out = getattr(args, "output", None)
    if out and Path(out).exists() and not getattr(args, "overwrite", False):
        raise argparse.ArgumentTypeError(f"-o {out}: already exists; pass --overwrite (replaces only a dsgraph "
                                         "artifact) or choose another directory")
    for dest, kind in OUTPUTS.items():
        value = getattr(args, dest, None)
        if value:
            check_output(value, kind, "--" + dest.replace("_", "-") if dest != "output" else "-o")


def one_line(text) -> str:
    """A message on one line (a checkpoint report lists its keys on several)."""
    return "; ".join(s.strip() for s in str(text).splitlines() if s.strip()) or type(text).__name__


def run(fn, args, debug: bool) -> int:
    """`fn()` with every error turned into one line on stderr (and its traceback with --debug)."""
    where = f"dsgraph {getattr(args, 'command', '')}".rstrip()
    try:
        check_outputs(args)
        return fn()
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # whoever read stdout stopped (`dsgraph list presets | head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # the exit's flush has nowhere to fail
        return 141                                                       # as a shell reports SIGPIPE
    except (DSGraphError, OSError, argparse.ArgumentTypeError) as e:
        if debug:
            traceback.print_exc()
        print(f"{where}: error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR
    except Exception as e:  # a bug of dsgraph, not the user's: still one line, the traceback on request
        if debug:
            traceback.print_exc()
        print(f"{where}: internal error ({type(e).__name__}: {one_line(e)}); rerun with --debug for the "
              "traceback and report it", file=sys.stderr)
        return 1
