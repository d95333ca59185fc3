"""Filesystem rules for names and paths that come from files dsgraph did not write (manifests, indexes).

A name from a manifest is checked before it reaches any filesystem call: one path component of a fixed
character set, no separators, no '..', nothing absolute, nothing hidden. A relative path is a '/'-joined
list of such names. `DirLock` is a create-exclusive lock file that two writers of one directory share.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path

from .errors import DSGraphError

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}$")


def safe_name(name, what: str, error=DSGraphError) -> str:
    """`name` if it is one plain file name (letters, digits, `_ . + -`, not starting with '.'), else `error`."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise error(f"{what}: {name!r} is not a plain file name (letters, digits, '_', '.', '+', '-'; no path "
                    "separators, '..' or absolute paths); the file is damaged or hostile, do not use it")
    return name


def safe_relpath(rel, what: str, error=DSGraphError) -> Path:
    """A '/'-separated relative path whose every component passes `safe_name`, as a Path."""
    if not isinstance(rel, str) or not rel or len(rel) > 1000:
        raise error(f"{what}: {rel!r} is not a relative file path")
    for part in rel.split("/"):
        safe_name(part, f"{what} (path {rel!r})", error)
    return Path(*rel.split("/"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a permission error means it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_pid(text: str) -> int | None:
    """The pid of a `pid@host` tag written by this host, else None (another host's, or garbage)."""
    pid, _, host = text.strip().partition("@")
    return int(pid) if pid.isdigit() and host == socket.gethostname() else None


def tag() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


class DirLock:
    """`with DirLock(dest, error):` holds `<parent>/.<name>.lock` (created exclusively, holding `pid@host`).
    A lock left by a dead process of this host is taken over; a live one is an `error` naming its pid."""

    def __init__(self, dest: Path, error=DSGraphError):
        self.path = dest.with_name(f".{dest.name}.lock")
        self.dest, self.error = dest, error

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = self.path.read_text()
                except OSError:
                    holder = ""
                pid = owner_pid(holder)
                if pid is not None and not pid_alive(pid):
                    self.path.unlink(missing_ok=True)  # stale: its writer died
                    continue
                raise self.error(f"{self.dest} is being written by another dsgraph process ({holder.strip() or '?'};"
                                 f" lock {self.path}); wait for it, or delete the lock if that process is gone"
                                 ) from None
            with os.fdopen(fd, "w") as f:
                f.write(tag())
            return self
        raise self.error(f"could not take the lock {self.path} for {self.dest}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        return False
