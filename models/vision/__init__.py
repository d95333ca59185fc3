"""Multimodal DeepSeek models: DeepSeek-VL and Janus / Janus-Pro (understanding). See tower.py for the graphs,
config.py for the presets, loader.py for the hub layout, image.py for preprocessing."""
from __future__ import annotations

from functools import partial

from .config import VL_PRESETS, VL_TINY, VLConfig, from_hf_vl  # noqa: F401
from .image import ImageConfig, image_config_from_dict, preprocess  # noqa: F401


def vision_preprocessor(model):
    """images -> pixel_values for a multimodal Model (its checkpoint's preprocessor config, or the defaults)."""
    return partial(preprocess, cfg=model.vision.image)
