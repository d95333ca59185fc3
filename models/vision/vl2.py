"""DeepSeek-VL2 (Tiny / Small / base): its config as DeepSeek ships it (`model_type: deepseek_vl_v2`, nested
`vision_config`, `projector_config`, `language_config`, `candidate_resolutions`, `tile_tag`, `global_view_pos`)
and its presets.

The parts (from DeepSeek's deepseek_vl2/models: modeling_deepseek_vl_v2.py, siglip_vit.py):
  * vision: a timm-layout SigLIP ViT (SO400M: width 1152, 27 layers, 16 heads, MLP 4304, patch 14 at 384),
    fused qkv, tanh GELU, LayerNorm eps 1e-6, the final norm; its attention-pooling head is unused;
  * projector `downsample_mlp_gelu`: a 2x2 pixel shuffle of the 27x27 grid (zero-padded to 28), then linears
    with exact GELUs between them (depth 2: 4608 -> n_embed -> n_embed);
  * the tile layout (`tile_tag: 2D`): per image a global view and w x h local tiles, each row of tokens ended by
    the learned `image_newline`, the global and local views parted by `view_seperator` (sic);
  * language: DeepSeek-V2 (MLA + DeepSeekMoE) for Small and base; Tiny sets `use_mla: false` and runs LLaMA
    attention (half-split rope), which is dsgraph's `deepseek` family.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dsgraph.errors import ConfigError

from ..config import ModelConfig, from_hf
from .config import VisionConfig

MODEL_TYPE = "deepseek_vl_v2"
_VISION_DEFAULTS = {"image_size": 384, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16, "mlp_ratio": 4}
_PROJECTOR_DEFAULTS = {"projector_type": "downsample_mlp_gelu", "input_dim": 1152, "n_embed": 2048, "depth": 2,
                       "mlp_ratio": 1, "downsample_ratio": 2, "token_pooling": False}
_MLA_KEYS = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclass
class ProjectorConfig:
    """`downsample_mlp_gelu`: pixel shuffle by downsample_ratio, then `depth` linears with GELUs between."""

    input_dim: int
    n_embed: int
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2

    @property
    def dims(self) -> tuple[int, ...]:
        """Widths through the linears: input_dim * r^2 -> n_embed * mlp_ratio -> ... -> n_embed."""
        mid = self.n_embed * self.mlp_ratio
        return (self.input_dim * self.downsample_ratio ** 2,) + (mid,) * (self.depth - 1) + (self.n_embed,)


@dataclass
class VL2Config:
    model_type: str
    text: ModelConfig
    vision: VisionConfig
    projector: ProjectorConfig
    image_token_id: int
    candidate_resolutions: tuple[tuple[int, int], ...]
    global_view_pos: str = "head"

    image_tokens = None   # tokens per image vary with its tiles (the runtime counts them per image)
    vision_prefix = "vision"

    @property
    def tile_side(self) -> int:
        """Tokens along each side of a tile after the pixel shuffle (384 / 14 = 27 -> 14)."""
        return math.ceil(self.vision.image_size // self.vision.patch_size / self.projector.downsample_ratio)

    def to_dict(self) -> dict:
        return asdict(self)


def _vision(vc: dict, source: str) -> VisionConfig:
    v = {**_VISION_DEFAULTS, **{k: x for k, x in vc.items() if x is not None}}
    if v.get("class_token") or v.get("ignore_head") is False or vc.get("global_pool", "map") not in ("map", ""):
        raise ConfigError(f"{source}: vision_config class_token / ignore_head false / global_pool "
                          f"{vc.get('global_pool')!r} are not DeepSeek-VL2's (patch tokens, no head); dsgraph builds "
                          "class_token false, ignore_head true")
    if v["width"] % v["heads"] or v["image_size"] < v["patch_size"]:
        raise ConfigError(f"{source}: vision_config width {v['width']} must split into heads {v['heads']} and "
                          f"image_size {v['image_size']} hold a patch of patch_size {v['patch_size']}")
    return VisionConfig(v["width"], int(v["width"] * v["mlp_ratio"]), v["layers"], v["heads"], v["image_size"],
                        v["patch_size"], 3, 1e-6, "tanh")


def _projector(pc: dict, vision: VisionConfig, d: int, source: str) -> ProjectorConfig:
    p = {**_PROJECTOR_DEFAULTS, **{k: x for k, x in pc.items() if x is not None}}
    if p["projector_type"] != "downsample_mlp_gelu" or p["token_pooling"]:
        raise ConfigError(f"{source}: projector_config projector_type {p['projector_type']!r} (token_pooling "
                          f"{p['token_pooling']}) is not supported; DeepSeek-VL2 ships 'downsample_mlp_gelu'")
    if p["input_dim"] != vision.hidden_size or p["n_embed"] != d or p["depth"] < 2:
        raise ConfigError(f"{source}: projector_config input_dim {p['input_dim']} / n_embed {p['n_embed']} / depth "
                          f"{p['depth']} must be the vision width {vision.hidden_size} / the language hidden_size {d}"
                          " / at least 2")
    return ProjectorConfig(p["input_dim"], p["n_embed"], p["depth"], p["mlp_ratio"], p["downsample_ratio"])


def _language(lc: dict, source: str) -> ModelConfig:
    """DeepSeek-V2 with MLA, or with `use_mla: false` LLaMA attention over the same MoE (`deepseek` family)."""
    mla = lc.get("use_mla", True)
    cfg = {**lc, "model_type": "deepseek_v2" if mla else "deepseek"}
    if not mla:
        cfg = {k: v for k, v in cfg.items() if k not in _MLA_KEYS}
    text = from_hf(cfg, source=f"{source} language_config")
    text.norm_topk_prob = bool(lc.get("norm_topk_prob", False))   # VL2's own MoE gate honours it (see from_hf)
    return text


def from_hf_vl2(cfg: dict, source: str = "config.json", image_token_id: int | None = None) -> VL2Config:
    """Read a DeepSeek-VL2 config dict; the `<image>` token id from config.json's `image_token_id` or, as DeepSeek
    ships it, the tokenizer (`image_token_id`, which the loader looks up)."""
    for key in ("vision_config", "projector_config", "language_config"):
        if not isinstance(cfg.get(key), dict):
            raise ConfigError(f"{source}: missing {key!r} (a nested config object) for {MODEL_TYPE}")
    if cfg.get("tile_tag", "2D") != "2D":
        raise ConfigError(f"{source}: tile_tag {cfg.get('tile_tag')!r} is not supported; DeepSeek-VL2 ships '2D' "
                          "(newline and view-separator tokens)")
    pos = cfg.get("global_view_pos", "head")
    if pos not in ("head", "tail"):
        raise ConfigError(f"{source}: global_view_pos {pos!r} must be 'head' or 'tail'")
    text = _language(cfg["language_config"], source)
    vision = _vision(cfg["vision_config"], source)
    projector = _projector(cfg["projector_config"], vision, text.hidden_size, source)
    res = cfg.get("candidate_resolutions") or [[vision.image_size, vision.image_size]]
    if any(len(r) != 2 or r[0] % vision.image_size or r[1] % vision.image_size or min(r) <= 0 for r in res):
        raise ConfigError(f"{source}: candidate_resolutions {res} must be [width, height] pairs of positive "
                          f"multiples of the tile size {vision.image_size}")
    token = cfg.get("image_token_id", image_token_id)
    if token is None:
        raise ConfigError(f"{source}: no '<image>' token id: ship the checkpoint's tokenizer.json (it holds "
                          "'<image>') or add 'image_token_id' to config.json")
    return VL2Config(MODEL_TYPE, text, vision, projector, int(token), tuple(tuple(r) for r in res), pos)


# the released [width, height] candidates, in their order (ties in select_best_resolution keep the first):
# every w x h grid of 384-pixel tiles with w * h <= 9
_TILES = ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1), (2, 2), (1, 5), (5, 1), (1, 6), (6, 1), (2, 3),
          (3, 2), (1, 7), (7, 1), (1, 8), (8, 1), (2, 4), (4, 2), (1, 9), (9, 1), (3, 3))


def _vl2(language: dict, width_embed: int, token: int) -> dict:
    return {"model_type": MODEL_TYPE, "tile_tag": "2D", "global_view_pos": "head", "image_token_id": token,
            "candidate_resolutions": [[384 * w, 384 * h] for w, h in _TILES],
            "vision_config": {"model_name": "siglip_so400m_patch14_384", "image_size": 384, "patch_size": 14,
                              "width": 1152, "layers": 27, "heads": 16, "mlp_ratio": 3.7362, "global_pool": "map",
                              "ignore_head": True, "class_token": False},
            "projector_config": {"projector_type": "downsample_mlp_gelu", "input_dim": 1152,
                                 "n_embed": width_embed, "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2},
            "language_config": {"model_type": "deepseek_v2", **language}}


_MOE = {"n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "scoring_func": "softmax",
        "topk_method": "greedy", "norm_topk_prob": False, "routed_scaling_factor": 1.0}
_TINY_LM = {**_MOE, "use_mla": False, "vocab_size": 129280, "hidden_size": 1280, "intermediate_size": 6848,
            "moe_intermediate_size": 896, "num_hidden_layers": 12, "num_attention_heads": 10,
            "num_key_value_heads": 10, "n_routed_experts": 64}
_SMALL_LM = {**_MOE, "use_mla": True, "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
             "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
             "num_key_value_heads": 16, "n_routed_experts": 64, "q_lora_rank": None, "kv_lora_rank": 512,
             "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
_BASE_LM = {**_SMALL_LM, "vocab_size": 129280, "hidden_size": 2560, "intermediate_size": 12288,
            "moe_intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 32,
            "num_key_value_heads": 32, "n_routed_experts": 72, "q_lora_rank": 1536, "topk_method": "noaux_tc",
            "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.0}
# the tiny test model, MLA + MoE like VL2-Small: 44-pixel tiles of 14-pixel patches (3 per side, the last 2
# pixels dropped, as 384 / 14), a 3x3 grid that the shuffle pads to 4x4 (as 27 -> 28) -> 2x2 tokens per tile;
# up to 2x2 tiles; one ViT block and one MoE layer (backend tests compile it: the reference tests run two of each)
_TINY_TEST_LM = {**_SMALL_LM, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
                 "moe_intermediate_size": 32, "num_hidden_layers": 1, "first_k_dense_replace": 0,
                 "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 3,
                 "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                 "max_position_embeddings": 512}
VL2_TINY: dict[str, dict] = {
    "deepseek-vl2-small-tiny": {
        **_vl2(_TINY_TEST_LM, 64, 255), "candidate_resolutions": [[44, 44], [88, 44], [44, 88], [88, 88]],
        "vision_config": {"image_size": 44, "patch_size": 14, "width": 32, "layers": 1, "heads": 2, "mlp_ratio": 2,
                          "global_pool": "map", "ignore_head": True, "class_token": False},
        "projector_config": {"projector_type": "downsample_mlp_gelu", "input_dim": 32, "n_embed": 64, "depth": 2,
                             "mlp_ratio": 1, "downsample_ratio": 2}},
}
# `<image>` ids of the released tokenizers (checkpoints read theirs from tokenizer.json)
VL2_PRESETS: dict[str, dict] = {
    "deepseek-vl2-tiny": _vl2(_TINY_LM, 1280, 128815),
    "deepseek-vl2-small": _vl2(_SMALL_LM, 2048, 100015),
    "deepseek-vl2": _vl2(_BASE_LM, 2560, 128815),
    **VL2_TINY,
}
