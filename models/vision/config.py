"""Configs of the multimodal models (DeepSeek-VL, its 7B hybrid, Janus / Janus-Pro), read from the hub's nested
`config.json` (`text_config`, `vision_config`, the hybrid's `high_res_vision_config`, `image_token_id`), and their
presets.

The language half is a `ModelConfig` (LLaMA shape); the vision half a `VisionConfig` (a SigLIP ViT) plus the
aligner that maps its features to the language model's width. What differs between the families is spelled as
data: the attention output projection's name, the MLP's GELU, and the aligner's linears.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from dsgraph.errors import ConfigError

from ..config import ModelConfig, from_hf
from ..presets import _llama
from .sam import SamConfig, sam_from_hf

# model_type -> (vision prefix, attention output name, aligner linear names, aligner GELU)
FAMILIES = {
    "deepseek_vl": ("model.vision_model", "out_proj", ("model.aligner.linear1", "model.aligner.linear2"), "none"),
    "janus": ("model.vision_model", "projection_layer", None, None),   # aligner: fc1 + hidden_layers, vision act
    # DeepSeek-VL 7B: SigLIP + SAM (models/vision/sam.py), whose aligner joins the two
    "deepseek_vl_hybrid": ("model.vision_model", "out_proj", ("model.aligner.vision_proj",
                           "model.aligner.high_res_vision_proj", "model.aligner.proj"), "none"),
}
GELU = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}


@dataclass
class VisionConfig:
    """A SigLIP ViT: conv patch embedding, learned positions, pre-norm blocks, a final LayerNorm."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    gelu: str = "tanh"                  # the `approximate` of mlp.gelu

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class GenerationConfig:
    """Janus' image-generation side the decoder sees (`vq_config`): codebook size and width, the generation
    aligner's and head's widths (the aligner ends at the text hidden size)."""

    num_embeddings: int
    embed_dim: int
    projection_dim: int
    aligner_layers: int = 2
    gelu: str = "none"
    # the VQ decoder (codes -> pixels): latent width, channels per resolution, blocks per resolution, code grid
    latent_channels: int = 256
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    out_channels: int = 3
    grid: int = 24


@dataclass
class VLConfig:
    model_type: str
    text: ModelConfig
    vision: VisionConfig
    image_token_id: int
    out_proj: str                       # the vision attention's output projection ("out_proj" | "projection_layer")
    aligner: tuple[str, ...]            # param prefixes of the aligner's linears, GELU between consecutive ones
    aligner_gelu: str
    aligner_dims: tuple[int, ...]       # widths: vision hidden -> ... -> text hidden
    generation: GenerationConfig | None = None   # Janus: text -> image tokens (models/vision/generation.py)
    high_res: SamConfig | None = None   # DeepSeek-VL hybrid: the SAM encoder beside SigLIP (models/vision/sam.py)

    @property
    def vision_prefix(self) -> str:
        return FAMILIES[self.model_type][0]

    @property
    def image_tokens(self) -> int:
        """Tokens per image (one per patch; DeepSeek-VL2's vary per image: models/vision/vl2.py)."""
        return self.vision.num_patches

    def to_dict(self) -> dict:
        return asdict(self)


def _vision(vc: dict, source: str, janus: bool) -> VisionConfig:
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"):
        if vc.get(key) is None:
            raise ConfigError(f"{source}: vision_config is missing {key!r}")
    act = vc.get("hidden_act", "gelu" if janus else "gelu_pytorch_tanh")
    if act not in GELU:
        raise ConfigError(f"{source}: vision_config hidden_act {act!r} not in {sorted(GELU)}")
    if vc.get("use_qk_norm"):
        raise ConfigError(f"{source}: vision_config use_qk_norm=true is not supported (no released checkpoint uses it)")
    inter = int(vc["hidden_size"] * vc.get("mlp_ratio", 4.0)) if janus else vc.get("intermediate_size")
    return VisionConfig(vc["hidden_size"], inter, vc["num_hidden_layers"], vc["num_attention_heads"],
                        vc["image_size"], vc["patch_size"], vc.get("num_channels", 3), vc.get("layer_norm_eps", 1e-6),
                        GELU[act])


def from_hf_vl(cfg: dict, source: str = "config.json") -> VLConfig:
    """Read a DeepSeek-VL / Janus config dict; ConfigError names the key and the fix."""
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise ConfigError(f"{source}: model_type {mt!r} is not a multimodal family; dsgraph builds {sorted(FAMILIES)}")
    for key in ("text_config", "vision_config"):
        if not isinstance(cfg.get(key), dict):
            raise ConfigError(f"{source}: missing {key!r} (a nested config object) for {mt}")
    text = from_hf({"model_type": "llama", **cfg["text_config"]}, source=f"{source} text_config")
    text.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", True))  # transformers ties by the top-level key
    janus = mt == "janus"
    vision = _vision(cfg["vision_config"], source, janus)
    d, (_, out_proj, aligner, gelu) = text.hidden_size, FAMILIES[mt]
    if janus:
        vc = cfg["vision_config"]
        depth, proj = vc.get("depth", 2), vc.get("projection_dim", d)
        if proj != d:
            raise ConfigError(f"{source}: vision_config projection_dim {proj} must equal text hidden_size {d}")
        aligner = ("model.aligner.fc1",) + tuple(f"model.aligner.hidden_layers.{i}" for i in range(depth - 1))
        gelu = vision.gelu
    dims = (vision.hidden_size,) + (d,) * len(aligner)
    high_res = None
    if mt == "deepseek_vl_hybrid":
        high_res = sam_from_hf(cfg.get("high_res_vision_config") or {}, source)
        dims = (vision.hidden_size, 4 * high_res.output_channels, d)
        if d % 2:
            raise ConfigError(f"{source}: text hidden_size {d} must be even (the hybrid aligner gives half to each "
                              "encoder)")
    gen = _generation(cfg["vq_config"], d, source) if janus and isinstance(cfg.get("vq_config"), dict) else None
    token = cfg.get("image_token_id", cfg.get("image_token_index"))
    if token is None:
        raise ConfigError(f"{source}: missing 'image_token_id' (the placeholder token the image features replace)")
    return VLConfig(mt, text, vision, int(token), out_proj, aligner, gelu, dims, gen, high_res)


def _generation(vq: dict, d: int, source: str) -> GenerationConfig:
    act = vq.get("hidden_act", "gelu")
    if act not in GELU:
        raise ConfigError(f"{source}: vq_config hidden_act {act!r} not in {sorted(GELU)}")
    width = vq.get("image_token_embed_dim", d)
    if width != d or vq.get("projection_dim", d) != d:
        raise ConfigError(f"{source}: vq_config image_token_embed_dim {width} and projection_dim "
                          f"{vq.get('projection_dim')} must equal text hidden_size {d}")
    mult = tuple(vq.get("channel_multiplier", (1, 1, 2, 2, 4)))
    base = vq.get("base_channels", 128)
    if any(base * m % 32 for m in mult):
        raise ConfigError(f"{source}: vq_config base_channels {base} x channel_multiplier {list(mult)} must be "
                          "multiples of 32 (the VQ decoder's GroupNorm groups)")
    return GenerationConfig(vq.get("num_embeddings", 16384), vq.get("embed_dim", 8), vq.get("projection_dim", d),
                            vq.get("num_hidden_layers", 2), GELU[act], vq.get("latent_channels", 256), base, mult,
                            vq.get("num_res_blocks", 2), vq.get("out_channels", 3), vq.get("num_patches", 24))


def _siglip_l(**kw):
    return {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "image_size": 384, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", **kw}


def _janus(text: dict, vision: dict, token: int, codebook: int = 16384, code_dim: int = 8, **vq) -> dict:
    d = text["hidden_size"]
    return {"model_type": "janus", "text_config": text, "image_token_id": token,
            "vq_config": {"num_embeddings": codebook, "embed_dim": code_dim, "projection_dim": d,
                          "image_token_embed_dim": d, "num_hidden_layers": 2, "hidden_act": "gelu", **vq},
            "vision_config": {**vision, "hidden_act": "gelu", "mlp_ratio": 4.0, "depth": 2,
                              "projection_dim": text["hidden_size"]}}


_TEXT_1B = _llama(2048, 5632, 24, 16, 16, max_position_embeddings=16384)
_TINY_TEXT = _llama(64, 128, 2, 4, 4, vocab=256, max_position_embeddings=512)
_TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "image_size": 28, "patch_size": 14}
VL_PRESETS: dict[str, dict] = {
    "deepseek-vl-1.3b": {"model_type": "deepseek_vl", "text_config": _TEXT_1B, "vision_config": _siglip_l(),
                         "image_token_id": 100015, "tie_word_embeddings": False},
    "deepseek-vl-7b": {"model_type": "deepseek_vl_hybrid", "text_config": _llama(4096, 11008, 30, 32, 32,
                                                                                  max_position_embeddings=16384),
                       "vision_config": _siglip_l(), "high_res_vision_config": {"image_size": 1024},   # SAM ViT-B
                       "image_token_id": 100015, "tie_word_embeddings": False},
    "janus-1.3b": _janus(_TEXT_1B, _siglip_l(), 100581),
    "janus-pro-1b": _janus(_TEXT_1B, _siglip_l(), 100581),
    "janus-pro-7b": _janus(_llama(4096, 11008, 30, 32, 32, max_position_embeddings=16384), _siglip_l(), 100581),
}
VL_TINY: dict[str, dict] = {
    "deepseek-vl-tiny": {"model_type": "deepseek_vl", "text_config": _TINY_TEXT, "image_token_id": 255,
                         "vision_config": {**_TINY_VISION, "hidden_act": "gelu_pytorch_tanh"},
                         "tie_word_embeddings": False},
    "deepseek-vl-hybrid-tiny": {   # SAM: a 4x4 grid in windows of 3 (padded) and one global block
        "model_type": "deepseek_vl_hybrid", "text_config": _TINY_TEXT, "image_token_id": 255,
        "vision_config": {**_TINY_VISION, "hidden_act": "gelu_pytorch_tanh"}, "tie_word_embeddings": False,
        "high_res_vision_config": {"hidden_size": 32, "output_channels": 16, "num_hidden_layers": 2,
                                   "num_attention_heads": 2, "image_size": 64, "patch_size": 16, "window_size": 3,
                                   "global_attn_indexes": [1], "mlp_dim": 48}},
    "janus-tiny": _janus(_TINY_TEXT, {**_TINY_VISION, "patch_size": 7}, 255, codebook=16, latent_channels=8,
                         base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1, num_patches=2),
}
VL_PRESETS.update(VL_TINY)
