"""Deployable artifacts: `exe.save(DIR)` and `dsgraph.load_artifact(DIR)`.

A directory that describes itself:
  manifest.json        format + version, dsgraph version, backend, device, dtype, model config,
                       graph hash, passes applied, creation time, and a sha256 per file
  graph.json           the optimised graph (mtp_graph.json too when the MTP branch was kept)
  weights.safetensors  weights in the layout the compiled code expects (absorbed, stacked, FP8)
  backend/             what the backend needs to run without recompiling (kernel sources and
                       tuned configs for triton, the exported shared library for tvm)
  tokenizer/           the checkpoint's tokenizer.json, tokenizer_config.json, generation_config.json
                       (when the model has a tokenizer), so text prompts work without the checkpoint
Writing is atomic (a temporary directory renamed into place), and loading verifies every
checksum and refuses an artifact made for another backend, device or a newer format.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsgraph.backends import get_backend
from dsgraph.errors import ArtifactError
from dsgraph.serialize import graph_from_json, graph_to_json
from dsgraph.text import has_tokenizer, load_tokenizer
from dsgraph.version import __version__
from dsgraph.weights import WeightStore

FORMAT = "dsgraph.artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _graph_hash(graph_json: dict) -> str:
    return hashlib.sha256(json.dumps(graph_json, sort_keys=True).encode()).hexdigest()


def _save_weights(graph_list, weights, path: Path) -> None:
    names = sorted({n for g in graph_list for n in g.params()})
    tensors = {n: weights[n].detach().to("cpu").contiguous() for n in names}
    save_file(tensors, str(path))


def save_artifact(exe, path, overwrite: bool = False) -> Path:
    """Write `exe` as an artifact directory at `path` (atomically)."""
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise ArtifactError(f"{dest} already exists; pass overwrite=True or choose another directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        graphs = {"graph.json": exe.graph}
        if exe.mtp is not None:
            graphs["mtp_graph.json"] = exe.mtp[0]
        main_json = None
        for fname, g in graphs.items():
            j = graph_to_json(g)
            main_json = main_json or j
            (tmp / fname).write_text(json.dumps(j))
        _save_weights(list(graphs.values()), exe.weights, tmp / "weights.safetensors")
        backend = get_backend(exe.compiled.report.backend)
        (tmp / "backend").mkdir()
        backend.save_compiled(exe.compiled, tmp / "backend" / "main")
        if exe.mtp is not None:
            backend.save_compiled(exe.mtp[1], tmp / "backend" / "mtp")
        if exe.tokenizer is not None:
            exe.tokenizer.save(tmp / TOKENIZER_DIR)
        files = {str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dsgraph_version": __version__,
            "backend": exe.compiled.report.backend, "device": exe.device.type, "dtype": exe.dtype,
            "model": {"name": exe.model.name, "config": exe.model.config.to_dict()},
            "graph_hash": _graph_hash(main_json),
            "passes": [list(p) if isinstance(p, tuple) else p for p in exe.compiled.report.passes],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__, "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def read_manifest(path) -> dict:
    root = Path(path)
    mf = root / MANIFEST
    if not mf.exists():
        raise ArtifactError(f"{root} is not a dsgraph artifact: {MANIFEST} is missing (a save that did not finish "
                            "leaves no manifest); recompile with `dsgraph compile MODEL -o DIR`")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mf} is not valid JSON ({e}); the artifact is damaged, recompile it") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mf}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{root} was written in artifact format {manifest['format_version']}, newer than this "
                            f"dsgraph reads ({FORMAT_VERSION}); upgrade dsgraph or recompile the artifact")
    return manifest


def verify_files(root: Path, manifest: dict) -> None:
    for rel, info in manifest["files"].items():
        p = root / rel
        if not p.exists():
            raise ArtifactError(f"artifact file {rel} is missing from {root}; the artifact is incomplete, recompile it")
        if p.stat().st_size != info["bytes"] or _sha256(p) != info["sha256"]:
            raise ArtifactError(f"artifact file {rel} in {root} does not match its checksum (truncated or edited); "
                                "recompile the artifact")


@dataclass
class ArtifactParts:
    """What an artifact directory holds, verified and ready to run; the application layer wraps it in an
    Executable with the model's config (dsgraph.load_artifact)."""

    manifest: dict
    graph: object
    weights: WeightStore
    compiled: object
    mtp: tuple | None
    device: str
    dtype: str
    tokenizer: object = None


def load_parts(path, device: str | None = None, backend: str | None = None) -> ArtifactParts:
    """Read and verify a saved artifact: its graphs, lazy weights and the backend's compiled code."""
    root = Path(path)
    manifest = read_manifest(root)
    if backend is not None and backend != manifest["backend"]:
        raise ArtifactError(f"{root} was compiled for backend {manifest['backend']!r}, not {backend!r}")
    device = device or manifest["device"]
    if torch.device(device).type != manifest["device"]:
        raise ArtifactError(f"{root} was compiled for device {manifest['device']!r}, not {device!r}; "
                            f"recompile with --device {torch.device(device).type}")
    verify_files(root, manifest)
    graph = graph_from_json(json.loads((root / "graph.json").read_text()))
    graph.verify()
    weights = WeightStore()
    with safe_open(str(root / "weights.safetensors"), framework="pt") as f:
        for k in f.keys():
            weights.set(k, lambda k=k: _read(root / "weights.safetensors", k))
    be = get_backend(manifest["backend"])
    dtype = manifest["dtype"]
    compiled = be.load_compiled(root / "backend" / "main", graph, weights, device, dtype)
    compiled.report.passes = [tuple(p) if isinstance(p, list) else p for p in manifest["passes"]]
    mtp = None
    if (root / "mtp_graph.json").exists():
        branch = graph_from_json(json.loads((root / "mtp_graph.json").read_text()))
        mtp = (branch, be.load_compiled(root / "backend" / "mtp", branch, weights, device, dtype))
    tok = load_tokenizer(root / TOKENIZER_DIR) if has_tokenizer(root / TOKENIZER_DIR) else None
    return ArtifactParts(manifest, graph, weights, compiled, mtp, device, dtype, tok)


def _read(path: Path, key: str):
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)
