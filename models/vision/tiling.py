"""DeepSeek-VL2's dynamic tiling (its processor's `processor_config.json`): each image becomes a global view (the
whole image fitted into one tile and padded with the background colour, the mean as 0..255 integers) and
w x h local tiles cut row-major from the image fitted into the best candidate resolution — the one keeping the
most of the image's pixels, then wasting the fewest (`select_best_resolution`). Prompts of more than two images
are not cropped (one local tile each), as DeepSeek's processor does. Tiles are rescaled to 0..1 and normalised.

The image's tokens (`image_layout`): with t x t tokens per tile, the global view's rows of t tokens each end with
the newline token, then the view separator, then the local tiles' (h*t) rows of (w*t) tokens, each also ended by
a newline (`global_view_pos: tail` puts the global view last). Layout entries index the table the vision graph
gathers from: 0 the newline, 1 the separator, 2 + r the r-th token row of the tiles' features (tile-major).

Fitting is Pillow's (bicubic resize of ImageOps.contain's size); padding, cropping and normalising are numpy.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsgraph.errors import ConfigError, InputError

NEWLINE, SEPARATOR, FIRST_FEATURE = 0, 1, 2


@dataclass(frozen=True)
class TiledImageConfig:
    size: int                                          # the tile side (candidate_resolutions[0][0])
    candidate_resolutions: tuple[tuple[int, int], ...]  # [width, height] pairs, multiples of size
    patch_size: int
    downsample_ratio: int
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    normalize: bool = True
    global_view_pos: str = "head"
    crop_max_images: int = 2   # prompts with more images get one local tile per image

    @property
    def background(self) -> tuple[int, ...]:
        return tuple(int(m * 255) for m in self.mean)

    @property
    def tile_side(self) -> int:
        return math.ceil(self.size // self.patch_size / self.downsample_ratio)


def tiled_image_config(vl2) -> TiledImageConfig:
    """The processor's defaults for a VL2Config (mean = std = 0.5)."""
    return TiledImageConfig(vl2.vision.image_size, vl2.candidate_resolutions, vl2.vision.patch_size,
                            vl2.projector.downsample_ratio, global_view_pos=vl2.global_view_pos)


def read_tiled_image_config(root: Path, vl2) -> TiledImageConfig:
    """processor_config.json when the checkpoint ships it (checked against the model's tile, patch and shuffle
    sizes), else the processor's defaults."""
    f = Path(root) / "processor_config.json"
    base = tiled_image_config(vl2)
    if not f.exists():
        return base
    try:
        cfg = json.loads(f.read_text())
    except ValueError as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from None
    res = tuple(tuple(r) for r in cfg.get("candidate_resolutions") or base.candidate_resolutions)
    got = (res[0][0], cfg.get("patch_size", base.patch_size), cfg.get("downsample_ratio", base.downsample_ratio))
    want = (base.size, base.patch_size, base.downsample_ratio)
    if got != want or any(len(r) != 2 or r[0] % base.size or r[1] % base.size or min(r) <= 0 for r in res):
        raise ConfigError(f"{f}: tile size, patch_size, downsample_ratio {got} must be the model's {want} and "
                          f"candidate_resolutions {[list(r) for r in res]} multiples of the tile size")
    return TiledImageConfig(base.size, res, base.patch_size, base.downsample_ratio,
                            tuple(cfg.get("image_mean", base.mean)), tuple(cfg.get("image_std", base.std)),
                            bool(cfg.get("normalize", True)), base.global_view_pos)


def select_best_resolution(width: int, height: int, candidates) -> tuple[int, int]:
    """The candidate (w, h) that keeps the most of the image's pixels once fitted, then wastes the fewest."""
    best, kept_best, waste_best = None, 0, math.inf
    for w, h in candidates:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - kept
        if kept > kept_best or (kept == kept_best and waste < waste_best):
            best, kept_best, waste_best = (w, h), kept, waste
    return best


def _pil(image):
    """A Pillow RGB image of an array [H, W, 3] uint8, a tensor [3, H, W] / [H, W, 3] uint8, or a PIL image."""
    from PIL import Image  # optional: VL2's tiling fits images with Pillow's bicubic resize
    if hasattr(image, "convert") and hasattr(image, "size"):
        return image.convert("RGB")
    chw = isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3
    a = image.permute(1, 2, 0).numpy() if chw else np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise InputError(f"a DeepSeek-VL2 image must be RGB uint8 [H, W, 3] (or [3, H, W]), got "
                         f"{a.dtype}{list(a.shape)}")
    return Image.fromarray(np.ascontiguousarray(a))


def fit(image, width: int, height: int, background) -> np.ndarray:
    """[height, width, 3] uint8: the image resized (bicubic) to fit, keeping its aspect ratio, centred on the
    background colour (Pillow's ImageOps.pad: the fitted side rounded half to even, so is the offset)."""
    from PIL import Image  # optional: see _pil
    iw, ih = image.size
    size = (width, height)
    if iw / ih > width / height:
        size = (width, round(ih / iw * width))
    elif iw / ih < width / height:
        size = (round(iw / ih * height), height)
    small = np.asarray(image.resize(size, resample=Image.Resampling.BICUBIC))
    out = np.empty((height, width, 3), np.uint8)
    out[:] = background
    x, y = round((width - size[0]) * 0.5), round((height - size[1]) * 0.5)
    out[y:y + size[1], x:x + size[0]] = small
    return out


def _normalise(tiles: np.ndarray, cfg: TiledImageConfig) -> torch.Tensor:
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    if not cfg.normalize:
        return x
    return (x - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]


def image_layout(w_tiles: int, h_tiles: int, side: int, head: bool = True) -> list[int]:
    """One image's token layout (module doc) over its tiles' feature rows, the global view's first."""
    def rows(n_rows, n_cols, feature):
        return [i for r in range(n_rows) for i in [feature(r, c) for c in range(n_cols)] + [NEWLINE]]
    glob = rows(side, side, lambda r, c: FIRST_FEATURE + r * side + c)
    local = rows(h_tiles * side, w_tiles * side, lambda r, c: FIRST_FEATURE + side * side * (
        1 + (r // side) * w_tiles + c // side) + (r % side) * side + c % side)
    return glob + [SEPARATOR] + local if head else local + [SEPARATOR] + glob


def tile_image(image, cfg: TiledImageConfig, crop: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
    """(tiles [1 + w*h, 3, size, size] float32, the global view first; (w, h) the local tile grid)."""
    im = _pil(image)
    s = cfg.size
    w, h = select_best_resolution(*im.size, cfg.candidate_resolutions) if crop else (s, s)
    local = fit(im, w, h, cfg.background)
    tiles = [fit(im, s, s, cfg.background)] + [local[y:y + s, x:x + s] for y in range(0, h, s) for x in range(0, w, s)]
    return _normalise(np.stack(tiles), cfg), (w // s, h // s)


def preprocess_tiled(images, cfg: TiledImageConfig) -> tuple[dict, list[int]]:
    """The vision graph's inputs for a prompt's images — pixel_values [all tiles, 3, size, size] and
    image_layout [all image tokens] (int64) — and each image's token count."""
    if not images:
        raise InputError("preprocess_tiled needs at least one image")
    crop, side = len(images) <= cfg.crop_max_images, cfg.tile_side
    pixels, layout, counts, rows = [], [], [], 0
    for image in images:
        tiles, (w, h) = tile_image(image, cfg, crop)
        own = image_layout(w, h, side, cfg.global_view_pos == "head")
        layout += [i + rows if i >= FIRST_FEATURE else i for i in own]
        pixels.append(tiles)
        counts.append(len(own))
        rows += tiles.shape[0] * side * side
    return {"pixel_values": torch.cat(pixels), "image_layout": torch.tensor(layout, dtype=torch.int64)}, counts
