"""A model: a graph, its lazy weights and the config it was built from; and building one from a preset."""
from __future__ import annotations

from dataclasses import dataclass

from dsgraph.dtypes import compute_dtype
from dsgraph.weights import WeightStore

from .builder import DecoderBuilder
from .config import ModelConfig, from_hf
from .presets import preset_config
from .random_weights import random_weights
from .summary import model_summary
from .v4 import V4Builder, v4_random_weights
from .v4_config import V4Config, from_hf_v4
from .v4_summary import v4_summary


@dataclass
class Model:
    """A graph, its weights (lazy name -> tensor map) and the config it was built from."""

    name: str
    config: ModelConfig
    graph: object
    weights: WeightStore

    def summary(self):
        return v4_summary(self) if isinstance(self.config, V4Config) else model_summary(self)


def config_from_dict(d: dict):
    """The config a graph or artifact recorded (`to_dict`), V4's or the one ModelConfig of the other families."""
    return (V4Config if d.get("model_type") == "deepseek_v4" else ModelConfig).from_dict(d)


def build_graph(config: ModelConfig, dtype: str = "float32", mtp: bool = True, name: str = "model"):
    if isinstance(config, V4Config):
        return V4Builder(config, compute_dtype(dtype), name=name).build()
    return DecoderBuilder(config, compute_dtype(dtype), name=name, mtp=mtp).build()


def build_model(name: str, seed: int = 0, dtype: str = "float32", mtp: bool = True,
                weights: bool = True, weights_device: str = "cpu", overrides: dict | None = None) -> Model:
    """A preset with deterministic random weights (generated lazily, per tensor, on `weights_device`);
    `overrides` replaces config.json keys of the preset (fewer layers, other head counts)."""
    source = f"preset {name}" + (f" with {overrides}" if overrides else "")
    hf = {**preset_config(name), **(overrides or {})}
    cfg = (from_hf_v4 if hf.get("model_type") == "deepseek_v4" else from_hf)(hf, source=source)
    graph = build_graph(cfg, dtype, mtp=mtp, name=name.replace("-", "_").replace(".", "_"))
    if not weights:
        return Model(name, cfg, graph, WeightStore())
    v4 = isinstance(cfg, V4Config)
    store = v4_random_weights(graph, cfg, seed, weights_device) if v4 else random_weights(graph, seed, weights_device)
    return Model(name, cfg, graph, store)
