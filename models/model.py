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
from .v4 import V4Builder, v4_random_weights
from .v4_config import V4Config, from_hf_v4
from .v4_summary import v4_summary
from .vision.config import VL_PRESETS, from_hf_vl
from .vision.generation import build_generation_graph
from .vision.image import ImageConfig, image_config
from .vision.tiling import tiled_image_config
from .vision.tower import build_vl_graphs
from .vision.vl2 import MODEL_TYPE as VL2_TYPE
from .vision.vl2 import VL2_PRESETS, from_hf_vl2
from .vision.vl2_tower import build_vl2_graphs
from .vision.vq import build_vq_decoder_graph


@dataclass
class Model:
    """A graph, its weights (lazy name -> tensor map) and the config it was built from."""

    name: str
    config: ModelConfig
    graph: object
    weights: WeightStore
    tokenizer: object = None    # dsgraph.text.Tokenizer where the checkpoint ships tokenizer.json
    vision: object = None   # multimodal models: a VisionPart (models/vision/), weights in the same store

    def summary(self):
        return v4_summary(self) if isinstance(self.config, V4Config) else model_summary(self)


    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs):
        """The checkpoint's chat template over `messages` (token ids; tokenize=False for the text)."""
        if self.tokenizer is None:
            raise TokenizerError(f"{self.name} has no tokenizer: its checkpoint ships no tokenizer.json")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)


def config_from_dict(d: dict, source: str = "model config"):
    """The config a graph or artifact recorded (`to_dict`), V4's or the one ModelConfig of the other families."""
    return V4Config.from_dict(d) if d.get("model_type") == "deepseek_v4" else ModelConfig.from_dict(d, source)


def build_graph(config: ModelConfig, dtype: str = "float32", mtp: bool = True, name: str = "model"):
    if isinstance(config, V4Config):
        return V4Builder(config, compute_dtype(dtype), name=name, mtp=mtp).build()
    return DecoderBuilder(config, compute_dtype(dtype), name=name, mtp=mtp).build()


def build_model(name: str, seed: int = 0, dtype: str = "float32", mtp: bool = True,
                weights: bool = True, weights_device: str = "cpu", overrides: dict | None = None) -> Model:
    """A preset with deterministic random weights (generated lazily, per tensor, on `weights_device`);
    `overrides` replaces config.json keys of the preset (fewer layers, other head counts)."""
    source = f"preset {name}" + (f" with {overrides}" if overrides else "")
    if name in VL_PRESETS or name in VL2_PRESETS:
        cfg = {**(VL_PRESETS.get(name) or VL2_PRESETS[name]), **(overrides or {})}
        return build_vl_model(name, cfg, source, seed, dtype, weights, weights_device)
    hf = {**preset_config(name), **(overrides or {})}
    cfg = (from_hf_v4 if hf.get("model_type") == "deepseek_v4" else from_hf)(hf, source=source)
    graph = build_graph(cfg, dtype, mtp=mtp, name=name.replace("-", "_").replace(".", "_"))
    tok = tiny_tokenizer() if name in TINY_PRESETS and cfg.vocab_size == TINY_VOCAB else None
    if not weights:
        return Model(name, cfg, graph, WeightStore(), tok)
    v4 = isinstance(cfg, V4Config)
    store = v4_random_weights(graph, cfg, seed, weights_device) if v4 else random_weights(graph, seed, weights_device)
    return Model(name, cfg, graph, store, tok)


@dataclass
class VisionPart:
    """A multimodal model's vision graph (pixels -> image features) and the config both graphs came from."""

    config: object   # models.vision.config.VLConfig, or DeepSeek-VL2's models.vision.vl2.VL2Config
    graph: object
    image: ImageConfig   # preprocessing (the checkpoint's preprocessor_config.json); VL2: a TiledImageConfig
    generation: object = None   # Janus: the image-generation decoder graph (models/vision/generation.py)
    vq_decoder: object = None   # Janus: codes -> pixels (models/vision/vq.py)


def build_vl_model(name: str, cfg: dict, source: str, seed: int = 0, dtype: str = "float32", weights: bool = True,
                   weights_device: str = "cpu") -> Model:
    """A DeepSeek-VL / VL2 / Janus preset: the decoder as the model's graph, the vision tower beside it."""
    gname, dt = name.replace("-", "_").replace(".", "_"), compute_dtype(dtype)
    generation = vq = None
    if cfg.get("model_type") == VL2_TYPE:
        vl = from_hf_vl2(cfg, source=source)
        (graph, vision), image = build_vl2_graphs(vl, dt, name=gname), tiled_image_config(vl)
    else:
        vl = from_hf_vl(cfg, source=source)
        graph, vision = build_vl_graphs(vl, dt, name=gname)
        image = image_config(vl.vision.image_size, vl.high_res and vl.high_res.image_size)
        generation = build_generation_graph(vl, dt, f"{gname}_generation") if vl.generation else None
        vq = build_vq_decoder_graph(vl.generation, dt, f"{gname}_vq_decoder") if vl.generation else None
    store = WeightStore()
    if weights:
        store = random_weights(graph, seed, weights_device)
        for part in (vision, *[g for g in (generation, vq) if g is not None]):
            extra = random_weights(part, seed, weights_device)
            for k in extra:
                store.set(k, extra.entry(k))
    return Model(name, vl.text, graph, store, vision=VisionPart(vl, vision, image, generation, vq))
