"""Multimodal DeepSeek models: DeepSeek-VL (and its 7B hybrid), DeepSeek-VL2 and Janus / Janus-Pro
(understanding and image generation). See tower.py / vl2_tower.py for the graphs, config.py / vl2.py for the
presets, loader.py for the hub layouts, image.py / tiling.py for preprocessing."""
from __future__ import annotations

from functools import partial

from .config import VL_PRESETS, VL_TINY, VLConfig, from_hf_vl  # noqa: F401
from .image import ImageConfig, image_config_from_dict, preprocess  # noqa: F401
from .tiling import TiledImageConfig, preprocess_tiled, select_best_resolution  # noqa: F401
from .vl2 import VL2_PRESETS, VL2_TINY, VL2Config, from_hf_vl2  # noqa: F401


def image_processors(cfg) -> dict:
    """VisionExecutable's preprocessing keywords for an image config: `preprocess` (one image -> its pixel
    inputs), or for DeepSeek-VL2's tiling `preprocess_images` (a prompt's images -> the tower's inputs and each
    image's token count: tiling depends on how many images the prompt holds)."""
    if isinstance(cfg, TiledImageConfig):
        return {"preprocess_images": partial(preprocess_tiled, cfg=cfg)}
    return {"preprocess": partial(preprocess, cfg=cfg)}


def vision_preprocessor(model) -> dict:
    """image_processors of a multimodal Model (its checkpoint's preprocessor config, or the defaults)."""
    return image_processors(model.vision.image)
