"""A model: a graph, its lazy weights and the config it was built from; and building one from a preset."""
from __future__ import annotations

from dataclasses import dataclass

from dsgraph.dtypes import compute_dtype
from dsgraph.errors import TokenizerError
from dsgraph.weights import WeightStore

from .builder import DecoderBuilder
from .config import ModelConfig, from_hf
from .presets import TINY_PRESETS, preset_config
from .random_weights import random_weights
from .summary import model_summary
from .tiny_tokenizer import VOCAB as TINY_VOCAB
from .tiny_tokenizer import tiny_tokenizer


@dataclass
class Model:
    """A graph, its weights (lazy name -> tensor map) and the config it was built from."""

    name: str
    config: ModelConfig
    graph: object
    weights: WeightStore
    tokenizer: object = None    # dsgraph.text.Tokenizer where the checkpoint ships tokenizer.json

    def summary(self):
        return model_summary(self)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs):
        """The checkpoint's chat template over `messages` (token ids; tokenize=False for the text)."""
        if self.tokenizer is None:
            raise TokenizerError(f"{self.name} has no tokenizer: its checkpoint ships no tokenizer.json")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)


def build_graph(config: ModelConfig, dtype: str = "float32", mtp: bool = True, name: str = "model"):
    return DecoderBuilder(config, compute_dtype(dtype), name=name, mtp=mtp).build()


def build_model(name: str, seed: int = 0, dtype: str = "float32", mtp: bool = True,
                weights: bool = True, weights_device: str = "cpu", overrides: dict | None = None) -> Model:
    """A preset with deterministic random weights (generated lazily, per tensor, on `weights_device`);
    `overrides` replaces config.json keys of the preset (fewer layers, other head counts)."""
    source = f"preset {name}" + (f" with {overrides}" if overrides else "")
    cfg = from_hf({**preset_config(name), **(overrides or {})}, source=source)
    graph = build_graph(cfg, dtype, mtp=mtp, name=name.replace("-", "_").replace(".", "_"))
    tok = tiny_tokenizer() if name in TINY_PRESETS and cfg.vocab_size == TINY_VOCAB else None
    return Model(name, cfg, graph, random_weights(graph, seed, weights_device) if weights else WeightStore(), tok)
