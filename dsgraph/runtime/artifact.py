"""Deployable artifacts: `exe.save(DIR)` and `dsgraph.load_artifact(DIR)`.

A directory that describes itself:
  manifest.json        format + version, dsgraph version, backend, device, dtype, model config,
                       graph hash, passes applied, tool versions, creation time, and a sha256 per file
  graph.json           the optimised graph (mtp_graph.json too when the MTP branch was kept)
  weights.safetensors  weights in the layout the compiled code expects (absorbed, stacked, FP8)
  backend/             what the backend needs to run without recompiling (kernel sources and
                       tuned configs for triton, the exported shared library for tvm)
  tokenizer/           the checkpoint's tokenizer.json, tokenizer_config.json, generation_config.json
                       (when the model has a tokenizer), so text prompts work without the checkpoint
  {part}_graph.json    a multimodal model's other graphs (`vision`, Janus' `generation` and `vq_decoder`),
                       their compiled code in backend/{part}; their weights join weights.safetensors (a name two
                       graphs share is the same tensor: one checkpoint through one pipeline) and the manifest
                       keeps each graph's hash and the image preprocessing config
Writing holds a lock file beside DIR, builds a sibling temporary directory and renames it into place; it
replaces only a directory holding a dsgraph manifest and the files it lists. Loading checks the manifest's
schema, then that the directory holds exactly its files with their checksums, then the graph hash, before
any file is parsed or handed to a backend (manifest.py).
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
from dsgraph.dtypes import ST_DTYPES
from dsgraph.errors import ArtifactError, DSGraphError
from dsgraph.progress import WRITE_MIN_BYTES, bar
from dsgraph.safefs import DirLock, owner_pid, pid_alive, sha256_file, tag
from dsgraph.serialize import graph_from_json, graph_to_json
from dsgraph.text import has_tokenizer, load_tokenizer
from dsgraph.version import __version__, tool_version
from dsgraph.weights import WeightStore

from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, PARTIAL, read_manifest, verify_files

TOKENIZER_DIR = "tokenizer"


def _graph_hash(graph_json: dict) -> str:
    return hashlib.sha256(json.dumps(graph_json, sort_keys=True).encode()).hexdigest()


def _save_weights(stores, path: Path) -> None:
    """The params of every (graphs, weights) pair in one file; a name already taken is not written again."""
    tensors = {}
    for graph_list, weights in stores:
        for n in sorted({n for g in graph_list for n in g.params()} - set(tensors)):
            tensors[n] = weights[n].detach().to("cpu").contiguous()
    save_file(tensors, str(path))


def save_artifact(exe, path, overwrite: bool = False) -> Path:
    """Write `exe` as an artifact directory at `path`: atomically, under a lock, replacing (with `overwrite`)
    only an artifact dsgraph wrote."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with DirLock(dest, ArtifactError):
        _clean_stale(dest)
        _check_replaceable(dest, overwrite)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.dsgraph-tmp-{os.getpid()}-", dir=dest.parent))
        try:
            (tmp / PARTIAL).write_text(tag())
            _write_contents(exe, tmp, dest.name)
            (tmp / PARTIAL).unlink()
            _swap_in(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _write_contents(exe, tmp: Path, name: str) -> None:
    graphs = {"graph.json": exe.graph}
    if exe.mtp is not None:
        graphs["mtp_graph.json"] = exe.mtp[0]
    parts = exe.artifact_parts()   # name -> (graph, weights, compiled) of a multimodal model's other graphs
    stores = [(list(graphs.values()), exe.weights)] + [([g], w) for g, w, _ in parts.values()]
    weight_bytes = sum(v.type.nbytes() for gs, _ in stores for g in gs for v in g.params().values())
    hashes = {}
    with bar(5, f"writing {name}", unit="step", long=weight_bytes >= WRITE_MIN_BYTES) as steps:
        steps.set_postfix_str("graphs")
        for fname, g in [*graphs.items(), *((f"{n}_graph.json", p[0]) for n, p in parts.items())]:
            j = graph_to_json(g)
            hashes[fname] = _graph_hash(j)
            (tmp / fname).write_text(json.dumps(j))
        steps.update(1)
        steps.set_postfix_str(f"weights ({weight_bytes / 2**30:.2f} GiB)")
        _save_weights(stores, tmp / "weights.safetensors")
        steps.update(1)
        steps.set_postfix_str("compiled backend")
        backend = get_backend(exe.compiled.report.backend)
        (tmp / "backend").mkdir()
        backend.save_compiled(exe.compiled, tmp / "backend" / "main")
        if exe.mtp is not None:
            backend.save_compiled(exe.mtp[1], tmp / "backend" / "mtp")
        for part, (_, _, compiled) in parts.items():
            backend.save_compiled(compiled, tmp / "backend" / part)
        steps.update(1)
        if exe.tokenizer is not None:
            exe.tokenizer.save(tmp / TOKENIZER_DIR)
        steps.update(1)
        steps.set_postfix_str("checksums")
        files = {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != PARTIAL}
        steps.update(1)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dsgraph_version": __version__,
        "backend": exe.compiled.report.backend, "device": exe.device.type, "dtype": exe.dtype,
        "model": {"name": exe.model.name, "config": exe.model.config.to_dict()},
        "graph_hash": hashes["graph.json"],
        **({"parts": {n: hashes[f"{n}_graph.json"] for n in parts}, "image": exe.image_config_dict()}
           if parts else {}),
        "passes": [list(p) if isinstance(p, tuple) else p for p in exe.compiled.report.passes],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "tools": {d: tool_version(d) for d in ("torch", "triton", "apache-tvm", "safetensors")}, "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))


def _check_replaceable(dest: Path, overwrite: bool) -> None:
    """Nothing at `dest`, or (with overwrite) a dsgraph artifact holding only the files its manifest lists."""
    if not dest.exists() and not dest.is_symlink():
        return
    if not overwrite:
        raise ArtifactError(f"{dest} already exists; pass overwrite=True (--overwrite) or choose another directory")
    if dest.is_symlink() or not dest.is_dir():
        raise ArtifactError(f"{dest} is not a directory dsgraph wrote (a file or link); refusing to replace it")
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
        listed = set(manifest["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        manifest, listed = None, set()
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{dest} exists and is not a dsgraph artifact (no {MANIFEST} of format {FORMAT!r}); "
                            "--overwrite only replaces artifacts — move it away or choose another directory")
    foreign = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")
                     if not p.is_dir() and p.relative_to(dest).as_posix() not in listed)
    if foreign:
        raise ArtifactError(f"{dest} holds files its manifest does not list, e.g. {foreign[:5]}; dsgraph did not "
                            "write them, so --overwrite will not delete them — move them or choose another directory")


def _swap_in(tmp: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.with_name(f".{dest.name}.dsgraph-old-{os.getpid()}")
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old)
    else:
        os.rename(tmp, dest)


def _clean_stale(dest: Path) -> None:
    """Remove what killed writes of `dest` left beside it (called under the lock, so no writer is active):
    temporary directories still marked partial by a dead process, and replaced artifacts not yet deleted."""
    for p in dest.parent.glob(f".{dest.name}.dsgraph-*-*"):
        kind, _, rest = p.name[len(dest.name) + 2:].partition("-")[2].partition("-")
        pid = int(rest.split("-")[0]) if rest.split("-")[0].isdigit() else None
        if pid is None or pid == os.getpid() or not p.is_dir() or p.is_symlink():
            continue
        try:
            ours = (kind == "tmp" and owner_pid((p / PARTIAL).read_text()) == pid) or \
                (kind == "old" and json.loads((p / MANIFEST).read_text()).get("format") == FORMAT)
        except (OSError, ValueError, AttributeError):
            ours = False
        if ours and not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


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
    parts: dict | None = None   # a multimodal model's other graphs: name -> (graph, compiled)


def load_parts(path, device: str | None = None, backend: str | None = None) -> ArtifactParts:
    """Read and verify a saved artifact: its graphs, lazy weights and the backend's compiled code. Nothing in the
    directory is parsed before the manifest's schema, the file list and every checksum are verified."""
    root = Path(path)
    manifest = read_manifest(root)
    if backend is not None and backend != manifest["backend"]:
        raise ArtifactError(f"{root} was compiled for backend {manifest['backend']!r}, not {backend!r}; run it "
                            f"without --backend, or compile it again with --backend {backend}")
    device = str(device or manifest["device"])
    kind = "cuda" if device.startswith("cuda") else device
    if kind != manifest["device"]:
        raise ArtifactError(f"{root} was compiled for device {manifest['device']!r}, not {device!r}; "
                            f"recompile with --device {kind}")
    verify_files(root, manifest)
    main_json = _read_json(root / "graph.json")
    if _graph_hash(main_json) != manifest["graph_hash"]:
        raise ArtifactError(f"{root / 'graph.json'} does not match the manifest's graph_hash (edited); "
                            "recompile the artifact")
    graph = _graph(main_json, root / "graph.json")
    weights, header = _weights(root / "weights.safetensors", graph)
    try:
        be = get_backend(manifest["backend"])
    except DSGraphError as e:
        raise ArtifactError(f"{root / MANIFEST}: {e}") from None
    dtype = manifest["dtype"]
    compiled = _load_compiled(be, root / "backend" / "main", graph, weights, device, dtype)
    compiled.report.passes = [tuple(p) if isinstance(p, list) else p for p in manifest["passes"]]
    mtp = None
    if "mtp_graph.json" in manifest["files"]:
        branch = _graph(_read_json(root / "mtp_graph.json"), root / "mtp_graph.json")
        mtp = (branch, _load_compiled(be, root / "backend" / "mtp", branch, weights, device, dtype))
    tok = load_tokenizer(root / TOKENIZER_DIR) if has_tokenizer(root / TOKENIZER_DIR) else None
    parts = {}
    for name, digest in (manifest.get("parts") or {}).items():
        path = root / f"{name}_graph.json"
        obj = _read_json(path)
        if _graph_hash(obj) != digest:
            raise ArtifactError(f"{path} does not match the manifest's hash of part {name!r} (edited); recompile "
                                "the artifact")
        g = _graph(obj, path)
        _check_params(root / "weights.safetensors", g, header)
        parts[name] = (g, _load_compiled(be, root / "backend" / name, g, weights, device, dtype))
    return ArtifactParts(manifest, graph, weights, compiled, mtp, device, dtype, tok, parts or None)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} cannot be read as JSON ({e}); the artifact is damaged, recompile it") from None


def _graph(obj, path: Path):
    try:
        graph = graph_from_json(obj, source=str(path))
        graph.verify()
    except DSGraphError as e:
        raise ArtifactError(f"{path}: not a valid dsgraph graph ({e}); recompile the artifact") from None
    return graph


def _weights(path: Path, graph) -> tuple[WeightStore, dict]:
    """Lazy weights and the file's header {name: (shape, dtype)}, after checking it holds every param of `graph`
    in its type."""
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for a damaged header
        raise ArtifactError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                            "recompile the artifact") from None
    _check_params(path, graph, found)
    weights = WeightStore()
    for k in found:
        weights.set(k, lambda k=k: _read(path, k))
    return weights, found


def _check_params(path: Path, graph, found: dict) -> None:
    for name, v in graph.params().items():
        want = (tuple(v.type.concrete({})), v.type.dtype)
        got = (found[name][0], ST_DTYPES.get(found[name][1], found[name][1])) if name in found else "absent"
        if got != want:
            raise ArtifactError(f"{path}: weight {name} is {got}, the graph expects {want}; recompile the artifact")


def _load_compiled(be, directory: Path, graph, weights, device: str, dtype: str):
    try:
        return be.load_compiled(directory, graph, weights, device, dtype)
    except DSGraphError:
        raise
    except Exception as e:  # the backend's own loader (a TVM module, its JSON) met data it cannot use
        raise ArtifactError(f"backend {be.name!r} cannot load the compiled code in {directory} "
                            f"({type(e).__name__}: {e}); the artifact is damaged or from another version, "
                            "recompile it") from None


def _read(path: Path, key: str):
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)
