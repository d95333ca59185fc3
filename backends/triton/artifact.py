"""What a Triton artifact carries: every generated kernel source and the tuned tile configs.

`kernels.json` lists the kernel files (content-addressed names) and the tuned tables, with the Triton version
they were made with. Loading never imports or copies an artifact's kernel file: the backend lowers the graph
again, which regenerates each kernel's text, and the artifact's copy must be byte-identical to it (so an edited,
re-signed kernel is refused, not run). The tuned configs are merged into the local cache; every name is
checked (`dsgraph.safefs.safe_name`) before it reaches the filesystem.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from dsgraph.errors import ArtifactError
from dsgraph.safefs import safe_name
from dsgraph.version import tool_version

from .codegen.source import emit
from .tuned import read_table, table_dir, table_path, valid_table, write_table

LISTING = "kernels.json"
_KERNEL_FILE = re.compile(r"^[A-Za-z0-9_]+_[0-9a-f]{12}\.py$")
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def save(compiled, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    sources = list(getattr(compiled, "sources", []))
    emit(sources, str(directory / "generated"))
    tuned = directory / "tuned"
    tuned.mkdir(exist_ok=True)
    tables = []
    for f in sorted(table_dir().glob("*.json")):
        if not _TABLE_NAME.match(f.stem):
            continue  # not a table dsgraph writes (kernel names are identifiers); loading would refuse it
        table = read_table(f)  # a corrupt local table is dropped with a warning, never shipped
        if table:
            (tuned / f.name).write_text(json.dumps(table, indent=1, sort_keys=True))
            tables.append(f.stem)
    listing = {"triton": tool_version("triton"), "kernels": sorted(s.filename for s in sources), "tuned": tables}
    (directory / LISTING).write_text(json.dumps(listing, indent=1))


def read_listing(directory: Path) -> dict:
    """The artifact's kernel listing, every name checked; an ArtifactError naming the file otherwise."""
    path = directory / LISTING
    try:
        listing = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} cannot be read as JSON ({e}); the artifact is damaged, recompile it") from None
    if isinstance(listing, list):  # artifacts written before the listing held tuned names and the version
        listing = {"kernels": listing, "tuned": sorted(p.stem for p in (directory / "tuned").glob("*.json"))}
    if not isinstance(listing, dict) or not all(isinstance(listing.get(k), list) for k in ("kernels", "tuned")):
        raise ArtifactError(f"{path} must hold lists 'kernels' and 'tuned'; the artifact is damaged, recompile it")
    for name in listing["kernels"]:
        safe_name(name, f"{path} kernel", ArtifactError)
        if not _KERNEL_FILE.match(name):
            raise ArtifactError(f"{path}: {name!r} is not a generated kernel file name (<kernel>_<hash12>.py)")
    for name in listing["tuned"]:
        safe_name(name, f"{path} tuned table", ArtifactError)
    return listing


def seed_cache(directory: Path) -> list[str]:
    """Merge the artifact's tuned configs into the local cache; returns the kernel file names it lists."""
    listing = read_listing(directory)
    for name in listing["tuned"]:
        path = directory / "tuned" / f"{name}.json"
        try:
            table = valid_table(json.loads(path.read_text()))
        except (OSError, ValueError):
            table = None
        if table is None:
            raise ArtifactError(f"{path} is not a table of tuned configs; the artifact is damaged, recompile it")
        write_table(table_path(name), table)
    return listing["kernels"]


def check_sources(directory: Path, sources) -> None:
    """Each kernel the lowering generated here must equal the artifact's copy byte for byte."""
    for src in sources:
        path = directory / "generated" / src.filename
        try:
            same = path.read_bytes() == src.text.encode()
        except OSError:
            raise ArtifactError(f"generated kernel {src.filename} is missing from {directory}; recompile the "
                                "artifact") from None
        if not same:
            raise ArtifactError(f"generated kernel {path} differs from the source this dsgraph generates for it "
                                "(edited); the artifact cannot be trusted, recompile it")
