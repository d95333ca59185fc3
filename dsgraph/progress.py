"""Progress bars on stderr for the steps a user waits for, through one wrapper over tqdm.

Every bar in the project comes from `bar` or `track`, so one set of rules decides whether it shows:
- never under `-q` (the `dsgraph` logger set above INFO) or with DSGRAPH_PROGRESS=0;
- always (whatever the size of the work) with DSGRAPH_PROGRESS=1, e.g. to see bars in a CI log;
- otherwise only when stderr is a terminal and the work is at least its threshold (a graph over
  MIN_NODES nodes, a checkpoint over LOAD_MIN_BYTES or LOAD_MIN_FILES files, ...), so tests, the demo
  and small models print nothing beyond their own output.
Bars leave nothing behind when they finish (leave=False): the output a user reads stays the commands' own.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

ENV = "DSGRAPH_PROGRESS"
# the thresholds under which work is quick enough not to need a bar
MIN_NODES = 2000                  # per-pass, per-node lowering and build loops over a graph
LOAD_MIN_BYTES = 2**30            # reading a checkpoint's tensors
LOAD_MIN_FILES = 8                # ... or indexing this many shards
WRITE_MIN_BYTES = 256 * 2**20     # writing an artifact's files

T = TypeVar("T")
_log = logging.getLogger("dsgraph")


def enabled(long: bool = True) -> bool:
    """Whether a bar shows, by the rules above; `long`: the work is over its threshold. The `dsgraph` logger left
    unset (library use, no CLI) does not silence bars; set to WARNING or above (-q) it does."""
    env = os.environ.get(ENV, "").strip()
    if env == "0" or (_log.level != logging.NOTSET and _log.level > logging.INFO):
        return False
    return env == "1" or (long and sys.stderr.isatty())


def bar(total: float | None, desc: str, unit: str = "it", long: bool = True, show: bool = True, **kw) -> tqdm:
    """A tqdm bar on stderr (a disabled one, which costs nothing, where `enabled(long)` says no, or the caller
    turned progress off with show=False). Bytes: unit="B" scales to KiB/MiB/GiB."""
    if unit == "B":
        kw = {"unit_scale": True, "unit_divisor": 1024, **kw}
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=not (show and enabled(long)),
                dynamic_ncols=True, **kw)


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", long: bool = True,
          show: bool = True, name=None) -> Iterable[T]:
    """`items`, with a bar advancing once per item (see `bar`); `total` defaults to len(items); `name(item)`, when
    given, shows the item being worked on."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with bar(total, desc, unit, long, show) as b:
        for item in items:
            if name is not None and not b.disable:
                b.set_postfix_str(str(name(item)), refresh=False)
            yield item
            b.update(1)


def write(msg: str) -> None:
    """A line on stderr that leaves an open bar intact (tqdm clears it, writes, redraws it)."""
    tqdm.write(msg, file=sys.stderr)
