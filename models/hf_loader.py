"""Load a Hugging Face checkpoint directory, as the hub ships it, into a `models.Model`.

    model = load_checkpoint("/ckpt/DeepSeek-V3")          # FP8 dequantised to the graph dtype on load
    model = load_checkpoint("/ckpt/DeepSeek-V3", keep_fp8=True)   # e4m3 + weight_scale_inv params

What it accepts (param names of the graph are the hub keys, so most map 1:1):
  * `config.json` read by `models.config.from_hf` (`rope_scaling` or transformers-5 `rope_parameters`);
  * one or many `*.safetensors`, with `model.safetensors.index.json` when sharded;
  * routed experts one key per expert (`model.layers.N.mlp.experts.E.gate_proj.weight`, the hub form and what
    transformers 5 writes with the default `save_pretrained`) or fused 3D (`mlp.experts.gate_up_proj` [E, 2I, D]
    = cat(gate, up) and `mlp.experts.down_proj` [E, D, I], what transformers 5 holds in memory and writes with
    `save_pretrained(save_original_format=False)`), split per expert lazily;
  * FP8 e4m3 weights with `weight_scale_inv` block scales (`quantization_config.weight_block_size`, partial edge
    blocks; float32, or V3.1 / V3.2's power-of-two `scale_fmt: ue8m0` ones, see hf_scales.py): kept as FP8
    params (`keep_fp8=True`; the graph dequantises them with `dequant_fp8` nodes) or dequantised per tensor as
    it is read (default; the graph is built without FP8);
  * V3.2's lightning indexer under each layer's attention (`self_attn.indexer.{wq_b,wk,k_norm,weights_proj}`);
  * the MTP module stored as layer `num_hidden_layers` (built when present and `mtp=True`);
  * tied embeddings (no `lm_head.weight`).

Every weight is a lazy WeightStore entry that reads its tensor when first used. Missing, unexpected or
wrongly shaped tensors are collected and raised together as one CheckpointError.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import replace
from pathlib import Path

from dsgraph.errors import CheckpointError, ConfigError
from dsgraph.text import has_tokenizer, load_tokenizer
from dsgraph.weights import SliceableEntry, WeightStore

from .config import from_hf
from .hf_scales import SCALE_DTYPES, read_scale
from .hf_shards import FLOAT_DTYPES, Shards, dequant_read
from .model import Model, VisionPart, build_graph
from .v4_config import from_hf_v4
from .v4_loader import build_v4, v4_graph_config
from .vision.config import FAMILIES as VL_FAMILIES
from .vision.loader import load_vl_parts
from .vision.vl2 import MODEL_TYPE as VL2_TYPE

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
# tensors some checkpoints carry that are not weights (old LLaMA exports saved the rope table)
_NOT_WEIGHTS = re.compile(r"\.rotary_emb\.inv_freq$")
_SHOW = 20  # list at most this many names per problem kind


def load_checkpoint(path, dtype: str = "float32", keep_fp8: bool = False, mtp: bool = True,
                    progress: bool = True, keep_fp4: bool = False):
    """Read a checkpoint directory into a Model with lazy weights (see the module doc; DeepSeek-V4's naming and
    MXFP4 experts: models/v4_loader.py, `keep_fp4` keeps them quantised)."""
    root = Path(path)
    raw = _read_config(root)
    if raw.get("model_type") == "deepseek_v4":
        return _load_v4(root, raw, dtype, keep_fp8, keep_fp4, progress, mtp)
    if raw.get("model_type") in (*VL_FAMILIES, VL2_TYPE):   # DeepSeek-VL / VL2 / Janus: models/vision/loader.py
        vl, (graph, vision, generation, vq), weights, image = load_vl_parts(root, raw, dtype, progress)
        return Model(root.name, vl.text, graph, weights, load_tokenizer(root) if has_tokenizer(root) else None,
                     VisionPart(vl, vision, image, generation, vq))
    cfg = from_hf(raw, source=str(root / "config.json"))
    shards = Shards(root, progress=progress)
    notes: list[str] = []
    ignored = _ignored_layers(cfg, shards, mtp, notes)
    graph_cfg = cfg if keep_fp8 else replace(cfg, fp8_block_size=None)
    name = re.sub(r"\W", "_", root.resolve().name) or "model"
    graph = build_graph(graph_cfg, dtype, mtp=mtp and not ignored["mtp_absent"], name=name)
    weights = _bind(graph, shards, cfg, ignored["prefixes"])
    for n in notes:
        warnings.warn(f"{root}: {n}", stacklevel=2)
    graph.meta["checkpoint"] = {"path": str(root), "keep_fp8": keep_fp8, "notes": notes}
    return Model(root.name, graph_cfg, graph, weights, load_tokenizer(root) if has_tokenizer(root) else None)


def _load_v4(root: Path, raw: dict, dtype: str, keep_fp8: bool, keep_fp4: bool, progress: bool, mtp: bool):
    cfg, notes = from_hf_v4(raw, source=str(root / "config.json")), []
    name = re.sub(r"\W", "_", root.resolve().name) or "model"
    graph, weights, missing, unexpected, wrong = build_v4(cfg, Shards(root, progress=progress), dtype, name,
                                                          keep_fp8, keep_fp4, notes, mtp)
    if missing or unexpected or wrong:
        raise CheckpointError(_problem_report(root, missing, unexpected, wrong))
    for n in notes:
        warnings.warn(f"{root}: {n}", stacklevel=3)
    graph.meta["checkpoint"] = {"path": str(root), "keep_fp8": keep_fp8, "keep_fp4": keep_fp4, "notes": notes}
    return Model(root.name, v4_graph_config(cfg, keep_fp8, keep_fp4), graph, weights)


def _read_config(root: Path) -> dict:
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory; give a Hugging Face checkpoint directory")
    f = root / "config.json"
    if not f.exists():
        raise ConfigError(f"{root} has no config.json: not a Hugging Face checkpoint directory")
    try:
        cfg = json.loads(f.read_text())
    except (ValueError, OSError) as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{f} must hold a JSON object, got {type(cfg).__name__}")
    if not isinstance(cfg.get("model_type", ""), str):   # it picks the family's loader, before the typed schema
        raise ConfigError(f"{f}: model_type must be a string such as \"deepseek_v3\", got {cfg['model_type']!r}; "
                          "fix config.json")
    return cfg


def _ignored_layers(cfg, shards: Shards, mtp: bool, notes: list[str]) -> dict:
    """Which MTP layers' keys to skip: all with mtp=False; those past the first (the graph builds one)."""
    n_layers, n_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    mtp_layers = [f"model.layers.{n_layers + j}." for j in range(n_mtp)]
    present = [p for p in mtp_layers if any(k.startswith(p) for k in shards.info)]
    out = {"prefixes": tuple(mtp_layers[1:]), "mtp_absent": False}
    if n_mtp == 0:
        return out
    if not mtp:
        out["prefixes"] = tuple(mtp_layers)
        return out
    if mtp_layers[0] not in present:
        out["mtp_absent"] = True
        notes.append(f"config.json sets num_nextn_predict_layers={n_mtp} but the checkpoint has no "
                     f"{mtp_layers[0]}* weights; built without the MTP branch")
    if n_mtp > 1:
        notes.append(f"{n_mtp} MTP layers in the config; dsgraph builds the first, ignoring {mtp_layers[1:]}")
    return out


def _bind(graph, shards: Shards, cfg, ignored_prefixes: tuple[str, ...]) -> WeightStore:
    """One lazy entry per graph param; raises CheckpointError listing every problem found."""
    store, used = WeightStore(reader=shards), set()
    missing, wrong = [], []
    for name, v in graph.params().items():
        want, want_dtype = v.type.concrete({}), v.type.dtype
        scale = name + "_scale_inv"
        if name in shards and scale in shards and want_dtype != "float8_e4m3fn":
            entry = _dequant_entry(name, scale, want, shards, cfg, wrong)
            used.update((name, scale))
        elif name.endswith("_scale_inv") and name in shards:
            entry = _scale_entry(name, want, shards, cfg, wrong)
            used.add(name)
        elif name in shards:
            entry = _direct_entry(name, want, want_dtype, shards, wrong)
            used.add(name)
        elif _EXPERT.match(name) and _fused_key(name, shards):
            entry = _fused_entry(name, want, shards, used, wrong)
        else:
            missing.append(f"{name} {list(want)}")
            continue
        if entry is not None:
            store.set(name, entry)
    unexpected = [k for k in shards.info if k not in used and not k.startswith(ignored_prefixes)
                  and not _NOT_WEIGHTS.search(k) and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected or wrong:
        raise CheckpointError(_problem_report(shards.root, missing, unexpected, wrong))
    return store


def _direct_entry(name, want, want_dtype, shards: Shards, wrong: list):
    info = shards.info[name]
    if info.shape != want:
        wrong.append(f"{name}: checkpoint {list(info.shape)}, model expects {list(want)}")
        return None
    if want_dtype == "float8_e4m3fn" and info.dtype != "float8_e4m3fn":
        wrong.append(f"{name}: checkpoint {info.dtype}, FP8 model expects float8_e4m3fn")
        return None
    if want_dtype != "float8_e4m3fn" and info.dtype not in FLOAT_DTYPES:
        hint = " (an FP8 weight without its weight_scale_inv)" if info.dtype == "float8_e4m3fn" else ""
        wrong.append(f"{name}: checkpoint dtype {info.dtype}{hint}, model expects a float weight")
        return None
    return SliceableEntry(lambda index: shards.read(name, index))


def _dequant_entry(name, scale, want, shards: Shards, cfg, wrong: list):
    w, s = shards.info[name], shards.info[scale]
    block = cfg.fp8_block_size
    if block is None:
        wrong.append(f"{name}: has {scale} but config.json has no FP8 quantization_config (weight_block_size)")
        return None
    grid = (-(-want[0] // block[0]), -(-want[1] // block[1])) if len(want) == 2 else None
    if w.shape != want or w.dtype != "float8_e4m3fn" or s.shape != grid or s.dtype not in SCALE_DTYPES:
        wrong.append(f"{name}: checkpoint {w.dtype}{list(w.shape)} with scales {list(s.shape)}, model expects "
                     f"float8_e4m3fn{list(want)} with scales {list(grid or ())} ({block[0]}x{block[1]} blocks)")
        return None
    return SliceableEntry(lambda index: dequant_read(shards, name, scale, block, index, cfg.fp8_scale_fmt))


def _scale_entry(name, want, shards: Shards, cfg, wrong: list):
    """A kept FP8 weight's block scales (keep_fp8=True), float32 whatever their stored format."""
    info = shards.info[name]
    if info.shape != want or info.dtype not in SCALE_DTYPES:
        wrong.append(f"{name}: checkpoint {info.dtype}{list(info.shape)}, model expects scales {list(want)} "
                     f"as one of {list(SCALE_DTYPES)}")
        return None
    return SliceableEntry(lambda index: read_scale(shards, name, cfg.fp8_scale_fmt, index))


def _fused_key(name: str, shards: Shards) -> str | None:
    prefix, _, proj = _EXPERT.match(name).groups()
    key = f"{prefix}.{'down_proj' if proj == 'down' else 'gate_up_proj'}"
    return key if key in shards else None


def _fused_entry(name, want, shards: Shards, used: set, wrong: list):
    """Expert e of transformers-5 fused tensors: gate_up_proj[e, :I] / [e, I:] ([E, 2I, D]), down_proj[e]."""
    prefix, e, proj = _EXPERT.match(name).groups()
    e, key = int(e), _fused_key(name, shards)
    info = shards.info[key]
    used.add(key)
    rows = 2 * want[0] if proj != "down" else want[0]
    if len(info.shape) != 3 or info.shape[1:] != (rows, want[1]) or e >= info.shape[0] \
            or info.dtype not in FLOAT_DTYPES:
        wrong.append(f"{key}: checkpoint {info.dtype}{list(info.shape)}, model expects float "
                     f"[num_experts > {e}, {rows}, {want[1]}] for {name}")
        return None
    if proj == "down":
        return lambda: shards.read(key, e)
    i = want[0]
    return lambda: shards.read(key, (e, slice(0, i) if proj == "gate" else slice(i, 2 * i)))


def _problem_report(root, missing, unexpected, wrong) -> str:
    def listed(kind, items, fix):
        more = f"\n    ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
        return f"  {len(items)} {kind} ({fix}):\n    " + "\n    ".join(items[:_SHOW]) + more
    parts = []
    if missing:
        parts.append(listed("missing weights", missing, "the checkpoint lacks keys config.json implies"))
    if unexpected:
        parts.append(listed("unexpected weights", sorted(unexpected),
                            "keys config.json does not account for: wrong config or another architecture"))
    if wrong:
        parts.append(listed("wrongly shaped or typed weights", wrong, "config.json and the tensors disagree"))
    return f"checkpoint {root} does not match its config.json:\n" + "\n".join(parts)
