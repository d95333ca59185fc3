"""The public entry points: `load` a model, `compile` it into an Executable, `load_artifact` a saved one.

This is the application layer: the one place where models, passes, backends and the runtime meet.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from dsgraph import models
from dsgraph import passes as passlib
from dsgraph.backends import Backend, get_backend
from dsgraph.dtypes import compute_dtype
from dsgraph.errors import ArtifactError, BackendUnavailable, CheckpointError, ConfigError, InputError, PassError
from dsgraph.parallel import ParallelPlan
from dsgraph.partition import split_graph
from dsgraph.runtime import artifact, distributed
from dsgraph.runtime.executable import Executable
from dsgraph.runtime.manifest import looks_like_artifact
from dsgraph.runtime.memory import check_weights_fit
from dsgraph.runtime.vision import VisionExecutable
from dsgraph.serialize import load_graph
from dsgraph.weights import WeightStore

log = logging.getLogger("dsgraph")


def load(path_or_preset: str, dtype: str = "float32", seed: int = 0, **options) -> models.Model:
    """A preset name, a Hugging Face checkpoint directory, or a saved graph JSON -> models.Model.
    dtype="auto" takes a checkpoint's config.json `torch_dtype` (FP8 checkpoints run in bfloat16), else fp32."""
    p = Path(str(path_or_preset))
    if dtype == "auto":
        dtype = _config_dtype(p / "config.json") if p.is_dir() else "float32"
    if not (p / "config.json").is_file() and options.pop("keep_fp8", False):
        raise InputError(f"keep_fp8 applies to FP8 checkpoint directories; {path_or_preset!r} is none")
    if p.is_dir():
        if (p / "config.json").exists():
            return models.load_checkpoint(p, dtype=dtype, **options)
        if (p / artifact.MANIFEST).exists():
            raise ConfigError(f"{p} is a compiled artifact: load it with dsgraph.load_artifact({str(p)!r})")
        if looks_like_artifact(p):
            raise ArtifactError(f"{p} looks like a dsgraph artifact whose {artifact.MANIFEST} is missing (deleted, "
                                "or its save did not finish); it cannot be verified, so it is not loaded — compile "
                                "it again with `dsgraph compile MODEL -o DIR`")
        raise ConfigError(f"{p} is a directory without config.json: not a Hugging Face checkpoint")
    if p.suffix == ".json" and p.exists():
        return _load_saved_graph(p)
    return models.build_model(str(path_or_preset), seed=seed, dtype=dtype, **options)


def _config_dtype(config: Path) -> str:
    try:
        cfg = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{config}: cannot read torch_dtype for dtype='auto' ({e})") from None
    name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return "bfloat16" if name.startswith("float8") else compute_dtype(name)


def _load_saved_graph(path: Path) -> models.Model:
    graph = load_graph(path)
    cfg_dict = graph.meta.get("config")
    if cfg_dict is None:
        raise ConfigError(f"{path}: graph has no meta.config; save graphs built by dsgraph models")
    weights_file = path.with_suffix(".safetensors")
    try:
        weights = WeightStore(load_file(str(weights_file))) if weights_file.exists() else WeightStore()
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
        raise CheckpointError(f"{weights_file} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    return models.Model(graph.name, models.config_from_dict(cfg_dict, source=f"{path} meta.config"), graph,
                        weights)


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
    dtype = None if dtype == "auto" else dtype      # the dtype the model was loaded in
    be = get_backend(backend)
    passes = _with_kv_cache_dtype(passes, be, kv_cache_dtype)
    reason = be.available(device)
    if reason:
        raise BackendUnavailable(f"backend {backend!r} cannot run on {device}: {reason}")
    dtype = compute_dtype(dtype or model.graph.meta.get("dtype", "float32"))
    model.graph.meta.setdefault("dtype", _embed_dtype(model.graph))  # graphs saved before the key existed
    t0 = time.perf_counter()
    log.debug(f"compiling {model.name} for {backend} on {device} ({dtype})")
    if parallel is not None:
        pipeline = be.default_pipeline() if passes == "default" else passes
        pipeline = [] if pipeline in ("none", None) else ([pipeline] if isinstance(pipeline, str) else list(pipeline))
        passes = [("shard", {"plan": parallel, "rank": distributed.rank_for(parallel, rank)}), *pipeline]
        distributed.init_groups(parallel)
    graph, weights, records = compile_graph(model.graph, model.weights, be, passes, keep_mtp, dump_after, dtype)
    log.debug(f"passes: {', '.join(getattr(r, 'name', str(r)) for r in records)} ({time.perf_counter() - t0:.2f}s)")
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
    log.debug(f"compiled {model.name} in {time.perf_counter() - t0:.2f}s")
    if model.vision is not None:
        return _vision_executable(model, be, passes, device, dtype, options,
                                  (model, graph, compiled, device, dtype, records), weights)
    return Executable(model, graph, compiled, device, dtype, records, mtp=mtp, weights=weights)


def _vision_executable(model, be: Backend, passes, device, dtype, options, parts, weights) -> VisionExecutable:
    """A multimodal model: the vision tower through the same pipeline and backend, beside the decoder."""
    def part(graph, what):
        g, w, records = compile_graph(graph, model.weights, be, passes, True, None, dtype)
        compiled = be.compile(g, w, device=device, dtype=dtype, **options)
        compiled.report.passes = [(r.name, r.summary()) if hasattr(r, "summary") else r for r in records]
        parts[2].report.notes.append(f"{what}: {compiled.report}")
        return g, w, compiled, records

    _, vision_w, vision, _ = part(model.vision.graph, "vision tower")
    generation = None
    if model.vision.generation is not None:   # Janus: text -> image tokens, over the same language model
        g, w, compiled, records = part(model.vision.generation, "image-generation decoder")
        generation = Executable(model, g, compiled, device, dtype, records, weights=w)
    vq_w, vq = part(model.vision.vq_decoder, "VQ decoder")[1:3] if model.vision.vq_decoder is not None else (None, None)
    return VisionExecutable(*parts, weights=weights, vision=vision, generation=generation, vq_decoder=vq,
                            **models.vision_preprocessor(model), image_config=model.vision.image,
                            part_weights={"vision": vision_w, "vq_decoder": vq_w})


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
        if dump_after is not None:
            raise PassError(f"--dump-after {dump_after!r}: the pipeline runs no passes for {be.name}")
        return graph, weights, []
    return passlib.run_pipeline(graph, weights, names, dump_after=dump_after)


def load_artifact(path: str | os.PathLike, device: str | None = None, backend: str | None = None) -> Executable:
    """Load a directory written by `exe.save` / `dsgraph compile -o`: checksums verified, no recompiling
    where the backend saved its compiled code."""
    parts = artifact.load_parts(path, device=device, backend=backend)
    info = parts.manifest["model"]
    config = models.config_from_dict(info["config"], source=f"{path}/manifest.json model.config")
    model = models.Model(info["name"], config, parts.graph, parts.weights, parts.tokenizer)
    args = (model, parts.graph, parts.compiled, parts.device, parts.dtype, parts.manifest["passes"])
    if not parts.parts:
        return Executable(*args, mtp=parts.mtp, weights=parts.weights)
    extra = parts.parts   # a multimodal model: its tower (and Janus' generation and VQ decoders) beside it
    image = models.vision.image_config_from_dict(parts.manifest["image"], f"{path}/manifest.json image")
    generation = None
    if "generation" in extra:
        generation = Executable(model, *extra["generation"], parts.device, parts.dtype, parts.manifest["passes"],
                                weights=parts.weights)
    return VisionExecutable(*args, weights=parts.weights, vision=extra["vision"][1], generation=generation,
                            vq_decoder=extra["vq_decoder"][1] if "vq_decoder" in extra else None,
                            **models.vision.image_processors(image), image_config=image,
                            part_weights={k: parts.weights for k in ("vision", "vq_decoder")})
