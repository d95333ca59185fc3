"""Modules built on one machine and run on another: for a GPU machine whose TVM is runtime-only.

`export_prebuilt(graph, device, root)` builds `graph` (after the backend's passes) for `device` into
`root/<key>/`, the key a hash of the graph, the device kind and the TVM version. With
`$DSGRAPH_TVM_PREBUILT=root` set, the tvm backend needs only TVM's runtime: compiling a graph loads `root/<key>/`
instead of lowering and building, and a graph nobody prebuilt is an error naming the command that builds it.
`dsgraph bench --prebuild DIR` writes every module a bench run needs; `dsgraph bench --prebuilt DIR` runs them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from dsgraph.serialize import graph_to_json
from dsgraph.version import tool_version

from .compiler import export_module
from .runtime import LIBRARY

ENV = "DSGRAPH_TVM_PREBUILT"


def prebuilt_root() -> Path | None:
    root = os.environ.get(ENV)
    return Path(root) if root else None


@functools.cache
def lowering_digest() -> str:
    """A digest of this backend's source: a module built by other lowering or schedule code is not reused."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(f.relative_to(Path(__file__).parent).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def graph_key(graph, device: str) -> str:
    """The module's directory name: the graph, the device kind, the TVM version and the lowering code (a module
    built by another TVM or another dsgraph is not reused)."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    text = json.dumps(graph_to_json(graph), sort_keys=True, default=str)
    digest = hashlib.sha256(f"{kind}|tvm {tool_version('apache-tvm')}|lowering {lowering_digest()}|{text}"
                            .encode()).hexdigest()[:16]
    return f"{graph.name}-{kind}-{digest}"


def export_prebuilt(graph, device: str, root) -> tuple[Path, bool]:
    """Build `graph` for `device` into root/<key>/ unless already there; returns (directory, built now)."""
    path = Path(root) / graph_key(graph, device)
    if (path / LIBRARY).exists():
        return path, False
    tmp = path.with_name(path.name + ".tmp")
    export_module(graph, device, tmp)
    tmp.rename(path)   # a crash mid-build leaves no directory that looks complete
    return path, True
