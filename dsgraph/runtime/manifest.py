"""The artifact manifest's schema, checked before anything else in the directory is read.

An artifact is untrusted input: its manifest must be a JSON object of the known format and version with every
required key of the right type, every file name in it a plain relative path (`dsgraph.safefs.safe_relpath`),
and the directory must hold exactly the listed files (no unlisted file, no link, nothing special), each matching
its size and sha256. Only then does the loader open any of them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from dsgraph.dtypes import COMPUTE_DTYPES
from dsgraph.errors import ArtifactError
from dsgraph.safefs import safe_relpath, sha256_file

FORMAT = "dsgraph.artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL = ".dsgraph-partial"  # inside a directory being written: it is not an artifact yet
REQUIRED_FILES = ("graph.json", "weights.safetensors")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_MANIFEST_BYTES = 64 << 20

# key -> (type(s), what the value must be)
_SCHEMA = {
    "format": (str, FORMAT), "format_version": (int, "an integer"), "dsgraph_version": (str, "a version string"),
    "backend": (str, "a backend name"), "device": (str, "'cpu' or 'cuda'"), "dtype": (str, "a compute dtype"),
    "model": (dict, "{name, config}"), "graph_hash": (str, "a sha256 hex digest"),
    "passes": (list, "a list of passes applied"), "files": (dict, "{path: {sha256, bytes}}"),
}


def _bad(mf: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{mf}: {what}; the manifest is damaged or was not written by dsgraph — recompile the "
                         "artifact with `dsgraph compile MODEL -o DIR`")


def check_schema(manifest, mf: Path) -> dict:
    """`manifest` if it fits the schema (required keys, types, format and version), else an ArtifactError."""
    if not isinstance(manifest, dict):
        raise _bad(mf, f"holds a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        raise _bad(mf, f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ArtifactError(f"{mf.parent} was written in artifact format {version}, newer than this dsgraph reads "
                            f"({FORMAT_VERSION}); upgrade dsgraph or recompile the artifact")
    for key, (kind, what) in _SCHEMA.items():
        if key not in manifest:
            raise _bad(mf, f"required key {key!r} is missing")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise _bad(mf, f"key {key!r} must be {what}, got {type(manifest[key]).__name__}")
    if version < 1:
        raise _bad(mf, f"format_version {version} is not a version this dsgraph wrote")
    if manifest["device"] not in ("cpu", "cuda"):
        raise _bad(mf, f"device {manifest['device']!r} is not 'cpu' or 'cuda'")
    if manifest["dtype"] not in COMPUTE_DTYPES:
        raise _bad(mf, f"dtype {manifest['dtype']!r} is not one of {list(COMPUTE_DTYPES)}")
    if not _HEX64.match(manifest["graph_hash"]):
        raise _bad(mf, "graph_hash is not a sha256 hex digest")
    if not all(isinstance(p, str) or (isinstance(p, list) and all(isinstance(x, str) for x in p))
               for p in manifest["passes"]):
        raise _bad(mf, "key 'passes' must list pass names or [name, summary] pairs")
    model = manifest["model"]
    if not isinstance(model.get("name"), str) or not isinstance(model.get("config"), dict):
        raise _bad(mf, "key 'model' must hold a string 'name' and an object 'config'")
    _check_parts(manifest, mf)
    _check_files(manifest["files"], mf)
    return manifest


PARTS = ("vision", "generation", "vq_decoder")   # a multimodal model's graphs beside the decoder


def _check_parts(manifest: dict, mf: Path) -> None:
    """The optional `parts` {name: graph hash} (names from PARTS: they name files) and, with them, `image`."""
    if "parts" not in manifest:
        return
    parts = manifest["parts"]
    if not isinstance(parts, dict) or not all(n in PARTS and isinstance(h, str) and _HEX64.match(h)
                                              for n, h in parts.items()) or "vision" not in parts:
        raise _bad(mf, f"key 'parts' must map names from {list(PARTS)} (vision among them) to sha256 digests")
    if not isinstance(manifest.get("image"), dict):
        raise _bad(mf, "key 'image' (the image preprocessing config) must be an object where 'parts' is given")
    missing = [f"{n}_graph.json" for n in parts if f"{n}_graph.json" not in manifest["files"]]
    if missing:
        raise _bad(mf, f"does not list the parts' files {missing}")


def _check_files(files: dict, mf: Path) -> None:
    for rel, info in files.items():
        safe_relpath(rel, f"{mf} file", ArtifactError)
        if rel == MANIFEST:
            raise _bad(mf, "lists itself among its files")
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) \
                or not _HEX64.match(info["sha256"]) or not isinstance(info.get("bytes"), int) \
                or isinstance(info["bytes"], bool) or info["bytes"] < 0:
            raise _bad(mf, f"file entry {rel!r} must be {{'sha256': 64 hex digits, 'bytes': a size}}")
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise _bad(mf, f"does not list the required files {missing}")


def read_manifest(path) -> dict:
    """The manifest of the artifact directory `path`, schema-checked (nothing else is read)."""
    root = Path(path)
    mf = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a directory; give the directory `dsgraph compile -o` wrote")
    if (root / PARTIAL).exists():
        raise ArtifactError(f"{root} is an artifact whose writing did not finish (it holds {PARTIAL}); delete it "
                            "and compile again")
    if not mf.is_file() or mf.is_symlink():
        raise ArtifactError(f"{root} is not a dsgraph artifact: {MANIFEST} is missing (a save that did not finish "
                            "leaves no manifest); recompile with `dsgraph compile MODEL -o DIR`")
    if mf.stat().st_size > _MAX_MANIFEST_BYTES:
        raise _bad(mf, f"is {mf.stat().st_size} bytes, more than a manifest can be")
    try:
        manifest = json.loads(mf.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mf} is not valid JSON ({e}); the artifact is damaged, recompile it") from None
    return check_schema(manifest, mf)


def verify_files(root: Path, manifest: dict) -> None:
    """The directory holds exactly the manifest's files (plain files, no links), each of its size and sha256."""
    listed = {safe_relpath(rel, "manifest file", ArtifactError): info for rel, info in manifest["files"].items()}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_symlink() or not (p.is_dir() or p.is_file()):
            raise ArtifactError(f"{root}: {rel} is a link or special file; an artifact holds only plain files — "
                                "the artifact is damaged or hostile, recompile it")
        if p.is_file() and rel not in listed and rel != Path(MANIFEST):
            raise ArtifactError(f"{root}: file {rel} is not listed in {MANIFEST} (added after saving); remove it "
                                "or recompile the artifact")
    for rel, info in listed.items():
        p = root / rel
        if not p.is_file():
            raise ArtifactError(f"artifact file {rel} is missing from {root}; the artifact is incomplete, recompile it")
        if p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
            raise ArtifactError(f"artifact file {rel} in {root} does not match its checksum (truncated or edited); "
                                "recompile the artifact")


def looks_like_artifact(root: Path) -> bool:
    """A directory with an artifact's files but perhaps no manifest (deleted, or a save cut short)."""
    return (root / MANIFEST).exists() or (root / PARTIAL).exists() or \
        ((root / "graph.json").exists() and (root / "weights.safetensors").exists())
