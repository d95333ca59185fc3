"""The package version, in the core so that any layer (artifacts, caches keyed by version) can read it."""
from __future__ import annotations

from functools import lru_cache
from importlib import metadata

__version__ = "0.1.0"


@lru_cache(maxsize=None)
def tool_version(dist: str) -> str:
    """The installed version of distribution `dist` (e.g. "triton", "apache-tvm") without importing it, or
    "absent": caches of generated code and tuned configs are keyed by it, so another version never reuses them."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"
