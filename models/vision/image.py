"""Image preprocessing of DeepSeek-VL (and its hybrid) and Janus (their processors' `preprocessor_config.json`):
resize the longer side to the tower's size (bicubic, antialiased; the shorter side rounded, at least `min_size`),
pad to a square with the background colour (the mean as 0..255 integers), rescale to 0..1 and normalise by mean
and std.

torch only: images are uint8 arrays [H, W, 3] (what numpy or PIL give) or tensors [3, H, W].
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsgraph.errors import ConfigError, InputError

from .tiling import TiledImageConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageConfig:
    size: int
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    min_size: int = 14
    rescale: float = 1 / 255
    background_color: tuple[int, ...] | None = None   # the padding colour; default: the mean as 0..255 integers
    high_res: "ImageConfig | None" = None   # DeepSeek-VL hybrid: SAM's view (its size, mean and std)

    @property
    def background(self) -> tuple[int, ...]:
        return self.background_color or tuple(int(m * 255) for m in self.mean)


def image_config(size: int, high_res_size: int | None = None) -> ImageConfig:
    """The processors' defaults at the towers' sizes."""
    return ImageConfig(size, high_res=ImageConfig(high_res_size) if high_res_size else None)


def image_config_from_dict(d: dict, source: str) -> ImageConfig | TiledImageConfig:
    """An ImageConfig (DeepSeek-VL2's: a TiledImageConfig) from its asdict() form (what artifacts keep);
    ConfigError naming `source` otherwise."""
    try:
        if "candidate_resolutions" in d:
            return TiledImageConfig(**{k: tuple(tuple(r) for r in v) if k == "candidate_resolutions" else
                                       tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        high = d.get("high_res")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "high_res"}
        return ImageConfig(**fields, high_res=image_config_from_dict(high, source) if high else None)
    except (TypeError, AttributeError) as e:
        raise ConfigError(f"{source}: not an image preprocessing config ({e})") from None


def _side(f: Path, cfg: dict, key: str, size: int) -> int:
    s = cfg.get(key, size)
    side = s.get("height", size) if isinstance(s, dict) else s
    if side != size:
        raise ConfigError(f"{f}: {key} {s} does not match the vision tower's image_size {size}")
    return side


def read_image_config(root: Path, size: int, high_res_size: int | None = None) -> ImageConfig:
    """The checkpoint's preprocessor_config.json, or the processors' defaults at the towers' sizes (the hybrid's
    SAM view: `high_res_size`, `high_res_image_mean`, `high_res_image_std`)."""
    f = Path(root) / "preprocessor_config.json"
    if not f.exists():
        return image_config(size, high_res_size)
    try:
        cfg = json.loads(f.read_text())
    except ValueError as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from None
    _side(f, cfg, "size", size)
    bg = cfg.get("background_color")
    common = dict(min_size=cfg.get("min_size", 14), rescale=cfg.get("rescale_factor", 1 / 255))
    high = None
    if high_res_size:
        _side(f, cfg, "high_res_size", high_res_size)
        high = ImageConfig(high_res_size, tuple(cfg.get("high_res_image_mean", CLIP_MEAN)),
                           tuple(cfg.get("high_res_image_std", CLIP_STD)), **common)
    return ImageConfig(size, tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD)),
                       background_color=tuple(bg) if bg else None, high_res=high, **common)


def _as_chw(image) -> torch.Tensor:
    t = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))   # a copy: PIL gives read-only
    if t.dim() == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
        t = t.permute(2, 0, 1)
    if t.dim() != 3 or t.shape[0] != 3:
        raise InputError(f"an image must be RGB [H, W, 3] or [3, H, W], got shape {tuple(t.shape)}")
    return t.float()


def preprocess(image, cfg: ImageConfig):
    """pixel_values [3, size, size] (float32) of one image; for the hybrid a dict that adds SAM's
    high_res_pixel_values [3, S, S] (the low-resolution view is resized from the padded high-resolution square, as
    transformers' processor does)."""
    x = _as_chw(image)
    if cfg.high_res is None:
        return _normalise(_square(x, cfg), cfg)
    high = _square(x, cfg.high_res)
    return {"pixel_values": _normalise(_square(high, cfg), cfg),
            "high_res_pixel_values": _normalise(high, cfg.high_res)}


def _square(x: torch.Tensor, cfg: ImageConfig) -> torch.Tensor:
    """0..255 values [3, size, size]: the longer side resized to size, padded with the background colour."""
    h, w = x.shape[1:]
    scale = cfg.size / max(h, w)
    nh, nw = max(round(h * scale), cfg.min_size), max(round(w * scale), cfg.min_size)
    for size in ((h, nw), (nh, nw)):   # one axis at a time, back to 0..255 integers between, as Pillow resizes
        x = F.interpolate(x[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
        x = x.round().clamp(0, 255)
    side = max(nh, nw)
    out = torch.tensor(cfg.background, dtype=torch.float32)[:, None, None].expand(3, side, side).clone()
    top, left = (side - nh) // 2, (side - nw) // 2
    out[:, top:top + nh, left:left + nw] = x
    return out


def _normalise(out: torch.Tensor, cfg: ImageConfig) -> torch.Tensor:
    mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
    return (out * cfg.rescale - mean) / std
