"""Helpers of the hostile-input tests: copy an artifact, re-sign it after an edit, list a tree."""
import hashlib
import json
import shutil

from hf_fixtures import write_preset


def copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def resign(root, edit_manifest=None):
    """Recompute every file's sha256 and size in the manifest (an attacker can), then apply `edit_manifest`."""
    mf = root / "manifest.json"
    m = json.loads(mf.read_text())
    m["files"] = {p.relative_to(root).as_posix(): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                                   "bytes": p.stat().st_size}
                  for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != "manifest.json"}
    if edit_manifest:
        edit_manifest(m)
    mf.write_text(json.dumps(m))
    return m


def tree(path):
    """Every path under `path` (to show nothing was written or deleted)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def write_checkpoint(path, name="deepseek-llm-tiny", shards=1, edit=None, config_edit=None):
    """A hub-layout checkpoint of a tiny preset (hf_fixtures.write_preset; the dense LLaMA shape by default)."""
    return write_preset(path, name, shards, edit, config_edit)
