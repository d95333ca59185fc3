"""The public entry points: `load` a model, `compile` it into an Executable, `load_artifact` a saved one.

This is the application layer: the one place where models, passes, backends and the runtime meet.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from dsgraph import models
from dsgraph import passes as passlib
from dsgraph.backends import Backend, get_backend
from dsgraph.dtypes import compute_dtype
from dsgraph.errors import BackendUnavailable, ConfigError, InputError
from dsgraph.parallel import ParallelPlan
from dsgraph.partition import split_graph
from dsgraph.runtime import artifact, distributed
from dsgraph.runtime.executable import Executable
from dsgraph.runtime.memory import check_weights_fit
from dsgraph.serialize import load_graph
from dsgraph.weights import WeightStore


def load(path_or_preset: str, dtype: str = "float32", seed: int = 0, **options) -> models.Model:
    """A preset name, a Hugging Face checkpoint directory, or a saved graph JSON -> models.Model."""
    p = Path(str(path_or_preset))
    if p.is_dir():
        if (p / "config.json").exists():
            return models.load_checkpoint(p, dtype=dtype, **options)
        if (p / artifact.MANIFEST).exists():
            raise ConfigError(f"{p} is a compiled artifact: load it with dsgraph.load_artifact({str(p)!r})")
        raise ConfigError(f"{p} is a directory without config.json: not a Hugging Face checkpoint")
    if p.suffix == ".json" and p.exists():
        return _load_saved_graph(p)
    return models.build_model(str(path_or_preset), seed=seed, dtype=dtype, **options)


def _load_saved_graph(path: Path) -> models.Model:
    graph = load_graph(path)
    cfg_dict = graph.meta.get("config")
    if cfg_dict is None:
        raise ConfigError(f"{path}: graph has no meta.config; save graphs built by dsgraph models")
    weights_file = path.with_suffix(".safetensors")
    weights = WeightStore(load_file(str(weights_file))) if weights_file.exists() else WeightStore()
    return models.Model(graph.name, models.config_from_dict(cfg_dict), graph, weights)


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(f"device {device!r} asked for, but torch sees no CUDA GPU here; use device='cpu'")
    if str(device) not in ("cpu",) and not str(device).startswith("cuda"):
        raise InputError(f"unknown device {device!r}; use 'cpu' or 'cuda'")
    return str(device)


def compile(model: models.Model, backend: str = "eager", device: str | None = "cpu", dtype=None, passes="default",
            keep_mtp: bool = False, dump_after: str | None = None, kv_cache_dtype: str | None = None,
            parallel: ParallelPlan | None = None, rank: int | None = None, **options) -> Executable:
    """Compile a model for `backend` on `device` in `dtype`; returns a dsgraph.runtime.Executable.

    `passes` is "default" (the backend's pipeline), "none", or a list of pass names.
    The MTP branch is pruned unless keep_mtp (plain decoding does not need it).
    kv_cache_dtype="fp8" stores absorbed MLA's latent cache in FP8 (the fp8_latent_cache pass, after absorb_mla).
    With `parallel` (a ParallelPlan), this process's rank of the plan (`rank`, default the process group's) is
    compiled: the shard pass runs first, the backend's pipeline after it, and the collectives go through
    torch.distributed (dsgraph.runtime.distributed.init joins torchrun's process group).
    """
    device = resolve_device(device)
    be = get_backend(backend)
    passes = _with_kv_cache_dtype(passes, be, kv_cache_dtype)
    reason = be.available(device)
    if reason:
        raise BackendUnavailable(f"backend {backend!r} cannot run on {device}: {reason}")
    dtype = compute_dtype(dtype or model.graph.meta.get("dtype", "float32"))
    model.graph.meta.setdefault("dtype", _embed_dtype(model.graph))  # graphs saved before the key existed
    if parallel is not None:
        pipeline = be.default_pipeline() if passes == "default" else passes
        pipeline = [] if pipeline in ("none", None) else ([pipeline] if isinstance(pipeline, str) else list(pipeline))
        passes = [("shard", {"plan": parallel, "rank": distributed.rank_for(parallel, rank)}), *pipeline]
    graph, weights, records = compile_graph(model.graph, model.weights, be, passes, keep_mtp, dump_after, dtype)
    check_weights_fit(graph, weights, torch.device(device), f"{model.name} ({backend}, {dtype})")
    mtp = None
    if "mtp_ids" in graph.inputs:  # keep_mtp: the MTP branch runs as its own step after the main one
        graph, branch = split_graph(graph, {"mtp_ids"})
        mtp = (branch, be.compile(branch, weights, device=device, dtype=dtype, **options))
    compiled = be.compile(graph, weights, device=device, dtype=dtype, **options)
    compiled.report.passes = [(r.name, r.summary()) if hasattr(r, "summary") else r for r in records]
    if parallel is not None:
        whole = compile_graph(model.graph, model.weights, be, "none", keep_mtp)[0]
        compiled.report.notes.append(distributed.shard_note(graph, whole))
    return Executable(model, graph, compiled, device, dtype, records, mtp=mtp, weights=weights)


def _with_kv_cache_dtype(passes, be: Backend, kv_cache_dtype: str | None):
    """The pipeline with fp8_latent_cache right after absorb_mla (absorb_mla added when absent)."""
    if kv_cache_dtype is None:
        return passes
    if kv_cache_dtype != "fp8":
        raise ConfigError(f"kv_cache_dtype={kv_cache_dtype!r}: supported are None (the compute dtype) and 'fp8'")
    names = list(be.default_pipeline()) if passes == "default" else \
        [] if passes in ("none", None) else [passes] if isinstance(passes, str) else list(passes)
    bare = [n if isinstance(n, str) else n[0] for n in names]
    if "absorb_mla" not in bare:
        names, bare = names + ["absorb_mla"], bare + ["absorb_mla"]
    return names[:bare.index("absorb_mla") + 1] + ["fp8_latent_cache"] + names[bare.index("absorb_mla") + 1:]


def _embed_dtype(graph) -> str:
    emb = graph.inputs.get("model.embed_tokens.weight")
    return emb.type.dtype if emb is not None else "float32"


def compile_graph(graph, weights, backend: str | Backend, passes="default", keep_mtp: bool = True,
                  dump_after: str | None = None, dtype: str | None = None):
    """Run `backend`'s pass pipeline (or `passes`: "default" | "none" | names) on a bare graph; returns
    (graph, weights, pass records). The MTP branch is pruned unless keep_mtp; a `dtype` other than the graph's
    compute dtype runs `retype` first. For tools that lower graphs that are not whole models (op workloads in
    `dsgraph bench`, prebuilt TVM modules) as well as for `compile`."""
    be = get_backend(backend) if isinstance(backend, str) else backend
    pipeline = be.default_pipeline() if passes == "default" else passes
    names = [] if pipeline in ("none", None) else ([pipeline] if isinstance(pipeline, str) else list(pipeline))
    if not keep_mtp and "mtp_ids" in graph.inputs:
        names = ["prune_mtp"] + [n for n in names if n != "prune_mtp"]
    elif keep_mtp:
        names = [n for n in names if n != "prune_mtp"]
    if dtype is not None and dtype != graph.meta.get("dtype", dtype):
        names = [("retype", {"dtype": dtype})] + names
    if not names:
        return graph, weights, []
    return passlib.run_pipeline(graph, weights, names, dump_after=dump_after)


def load_artifact(path: str | os.PathLike, device: str | None = None, backend: str | None = None) -> Executable:
    """Load a directory written by `exe.save` / `dsgraph compile -o`: checksums verified, no recompiling
    where the backend saved its compiled code."""
    parts = artifact.load_parts(path, device=device, backend=backend)
    info = parts.manifest["model"]
    model = models.Model(info["name"], models.config_from_dict(info["config"]), parts.graph, parts.weights)
    return Executable(model, parts.graph, parts.compiled, parts.device, parts.dtype, parts.manifest["passes"],
                      mtp=parts.mtp, weights=parts.weights)
