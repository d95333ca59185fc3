"""What a Triton artifact carries: every generated kernel source and the tuned tile configs.

Loading seeds the local kernel cache from the artifact before lowering, so the same sources are
imported (content-addressed file names) and every tuned shape is found without timing it again.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dsgraph.errors import ArtifactError

from .codegen.source import emit
from .runtime import cache_dir


def save(compiled, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    emit(list(getattr(compiled, "sources", [])), str(directory / "generated"))
    tuned = directory / "tuned"
    tuned.mkdir(exist_ok=True)
    for f in Path(cache_dir("tuned")).glob("*.json"):
        shutil.copyfile(f, tuned / f.name)
    (directory / "kernels.json").write_text(json.dumps(sorted(s.filename for s in getattr(compiled, "sources", []))))


def seed_cache(directory: Path) -> list[str]:
    """Copy the artifact's sources and tuned configs into the kernel cache; returns the kernel file names."""
    listed = json.loads((directory / "kernels.json").read_text())
    gen = Path(cache_dir("generated"))
    for name in listed:
        src = directory / "generated" / name
        if not src.exists():
            raise ArtifactError(f"generated kernel {name} is missing from {directory}; recompile the artifact")
        if not (gen / name).exists():
            tmp = gen / f"{name}.{os.getpid()}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, gen / name)
    tuned = Path(cache_dir("tuned"))
    for f in (directory / "tuned").glob("*.json"):
        table = json.loads(f.read_text())
        local = tuned / f.name
        if local.exists():
            table = {**table, **json.loads(local.read_text())}
        tmp = tuned / f"{f.name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, local)
    return listed
