"""The thin public layer that wires models, passes and backends together
(the only part of dsgraph that imports them — DESIGN.md: no back edges)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .dtypes import compute_dtype
from .errors import BackendUnavailable, ConfigError, InputError
from .memory import check_weights_fit


def load(path_or_preset: str, dtype: str = "float32", seed: int = 0, **options):
    """A preset name, a Hugging Face checkpoint directory, or a saved graph JSON -> models.Model."""
    import models
    p = Path(str(path_or_preset))
    if p.is_dir():
        if (p / "config.json").exists():
            from models.hf_loader import load_checkpoint
            return load_checkpoint(p, dtype=dtype, **options)
        if (p / "manifest.json").exists():
            raise ConfigError(f"{p} is a compiled artifact: load it with dsgraph.load_artifact({str(p)!r})")
        raise ConfigError(f"{p} is a directory without config.json: not a Hugging Face checkpoint")
    if p.suffix == ".json" and p.exists():
        return _load_saved_graph(p)
    return models.build_model(str(path_or_preset), seed=seed, dtype=dtype, **options)


def _load_saved_graph(path: Path):
    import models

    from .serialize import load_graph
    from .weights import WeightStore
    graph = load_graph(path)
    cfg_dict = graph.meta.get("config")
    if cfg_dict is None:
        raise ConfigError(f"{path}: graph has no meta.config; save graphs built by dsgraph models")
    weights_file = path.with_suffix(".safetensors")
    weights = WeightStore()
    if weights_file.exists():
        from safetensors.torch import load_file
        weights = WeightStore(load_file(str(weights_file)))
    return models.Model(graph.name, models.ModelConfig.from_dict(cfg_dict), graph, weights)


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(f"device {device!r} asked for, but torch sees no CUDA GPU here; use device='cpu'")
    if str(device) not in ("cpu",) and not str(device).startswith("cuda"):
        raise InputError(f"unknown device {device!r}; use 'cpu' or 'cuda'")
    return str(device)


def compile(model, backend: str = "eager", device: str | None = "cpu", dtype=None, passes="default",
            keep_mtp: bool = False, dump_after: str | None = None, **options):
    """Compile a model for `backend` on `device` in `dtype`; returns a backends.Executable.

    `passes` is "default" (the backend's pipeline), "none", or a list of pass names.
    The MTP branch is pruned unless keep_mtp (plain decoding does not need it).
    """
    import models
    from backends import get_backend
    from backends.executable import Executable

    device = resolve_device(device)
    be = get_backend(backend)
    reason = be.available(device)
    if reason:
        raise BackendUnavailable(f"backend {backend!r} cannot run on {device}: {reason}")
    graph_dtype = next((v.type.dtype for n, v in model.graph.params().items() if n == "model.embed_tokens.weight"),
                       "float32")
    dtype = compute_dtype(dtype or graph_dtype)
    graph = model.graph
    if dtype != graph_dtype:
        graph = models.build_graph(model.config, dtype, mtp="mtp_ids" in graph.inputs, name=graph.name)
    graph, weights, records = _run_passes(graph, model.weights, be, passes, keep_mtp, dump_after)
    check_weights_fit(graph, weights, torch.device(device), f"{model.name} ({backend}, {dtype})")
    mtp = None
    if "mtp_ids" in graph.inputs:  # keep_mtp: the MTP branch runs as its own step after the main one
        from .partition import split_graph
        graph, branch = split_graph(graph, {"mtp_ids"})
        mtp = (branch, be.compile(branch, weights, device=device, dtype=dtype, **options))
    compiled = be.compile(graph, weights, device=device, dtype=dtype, **options)
    compiled.report.passes = [(r.name, r.summary()) if hasattr(r, "summary") else r for r in records]
    return Executable(model, graph, compiled, device, dtype, records, mtp=mtp, weights=weights)


def _run_passes(graph, weights, backend, pipeline, keep_mtp, dump_after):
    try:
        import passes as passlib
    except ModuleNotFoundError:
        passlib = None
    if pipeline == "default":
        pipeline = backend.default_passes
    names = [] if pipeline in ("none", None) else ([pipeline] if isinstance(pipeline, str) else list(pipeline))
    if not keep_mtp and "mtp_ids" in graph.inputs:
        names = ["prune_mtp"] + [n for n in names if n != "prune_mtp"]
    elif keep_mtp:
        names = [n for n in names if n != "prune_mtp"]
    if not names:
        return graph, weights, []
    if passlib is None:
        raise BackendUnavailable(f"passes {names} asked for, but the passes package is not installed")
    return passlib.run_pipeline(graph, weights, names, dump_after=dump_after)


def load_artifact(path: str | os.PathLike, device: str | None = None, backend: str | None = None):
    """Load a directory written by `exe.save` / `dsgraph compile -o`: checksums verified, no recompiling
    where the backend saved its compiled code."""
    from backends.artifact import load_artifact as _load
    return _load(path, device=device, backend=backend)
