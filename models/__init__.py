"""The DeepSeek model zoo: configs, presets, one decoder builder, random weights and
the Hugging Face checkpoint loader.

    model = models.build_model("deepseek-v3-tiny", seed=0)     # random weights, lazy
    model = models.build_model("deepseek-v2-lite", overrides={"num_hidden_layers": 2})  # a preset, cut down
    model = models.load_checkpoint("/path/to/DeepSeek-V2-Lite")  # see models/hf_loader.py
"""
from __future__ import annotations

from .builder import DecoderBuilder  # noqa: F401
from .config import ModelConfig, from_hf, rope_attrs  # noqa: F401
from .hf_loader import load_checkpoint  # noqa: F401
from .model import Model, build_graph, build_model, config_from_dict  # noqa: F401
from .presets import PRESETS, TINY_PRESETS, preset_config  # noqa: F401
from .random_weights import quantize_fp8_block, random_weights  # noqa: F401
from .vision import VL_PRESETS, VL_TINY, vision_preprocessor  # noqa: F401
