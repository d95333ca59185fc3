"""Helpers of the hostile-input tests: copy an artifact, re-sign it after an edit, list a tree."""
import hashlib
import json
import shutil

import dsgraph.models as models
from safetensors.torch import save_file


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
    """A hub-layout checkpoint (config.json, safetensors shards, an index when sharded) of a tiny preset."""
    path.mkdir(parents=True, exist_ok=True)
    m = models.build_model(name, seed=0)
    tensors = {k: m.weights[k].contiguous() for k in m.graph.params()}
    if edit:
        edit(tensors)
    cfg = models.preset_config(name)
    if config_edit:
        config_edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(path / fname))
        weight_map.update({k: fname for k in part})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path
