"""Where dsgraph keeps per-machine files (tuned kernel configs, generated sources, measured peaks).

One root for all of them, `$DSGRAPH_CACHE_DIR` or ~/.cache/dsgraph, so a user clears or relocates it in one place."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("DSGRAPH_CACHE_DIR") or Path.home() / ".cache" / "dsgraph")


def cache_dir(*parts: str) -> Path:
    """`cache_root()/parts...`, created on first use."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
