"""The on-disk tables of tuned tile configs, `<cache>/triton/tuned/<kernel>.json`: entry key -> config.

Read defensively: a table that is not a JSON object of string keys is dropped with a warning (and a corrupt
entry is never copied into an artifact); written atomically (a temporary file renamed into place), merging
what another process added meanwhile. No triton import here: artifacts read and write these tables before the
backend has chosen interpreter or GPU mode.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from .runtime import cache_dir

_CONFIG_TYPES = (dict, list, int, str)


def table_dir() -> Path:
    return Path(cache_dir("tuned"))


def table_path(kernel: str) -> Path:
    return table_dir() / f"{kernel}.json"


def valid_table(obj) -> dict | None:
    """`obj` if it is a tuned table (string keys; dict, list, int or str configs), else None."""
    if not isinstance(obj, dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, _CONFIG_TYPES) and not isinstance(v, bool)
               for k, v in obj.items()):
        return None
    return obj


def read_table(path: Path) -> dict:
    """The table at `path`, or {} when absent; a corrupt one is dropped (warned about, removed)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        warnings.warn(f"tuned config table {path} cannot be read ({e}); ignoring it", stacklevel=2)
        return {}
    try:
        table = valid_table(json.loads(text))
    except ValueError:
        table = None
    if table is None:
        warnings.warn(f"tuned config table {path} is corrupt (not a JSON object of configs); dropping it, "
                      "its shapes will be tuned again", stacklevel=2)
        Path(path).unlink(missing_ok=True)
        return {}
    return table


def write_table(path: Path, entries: dict) -> None:
    """Merge `entries` into the table at `path` (re-read first: another process may have added shapes)."""
    table = {**read_table(path), **entries}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
