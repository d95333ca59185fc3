"""DeepSeek-VL 7B's high-resolution branch (transformers `deepseek_vl_hybrid`): a SAM ViT-B encoder beside the
SigLIP tower, and the hybrid aligner that joins the two.

SAM (NHWC over its patch grid): patch embedding + absolute positions; blocks of LayerNorm, attention (windowed
with zero padding, or global at `global_attn_indexes`) with decomposed relative positions, LayerNorm, GELU MLP;
a neck (1x1 conv, channels-first LayerNorm, 3x3 conv, LayerNorm). The hybrid model takes SAM's necked output and,
through a second neck, the hidden state after the first global block; each goes through the same projection
(bilinear resize to 4x the SigLIP grid, two stride-2 3x3 convs) and they add as `last + alpha * global`. The
aligner maps SigLIP and SAM features to half the text width each, concatenates (SAM first), GELU, one linear.
Params are the hub keys (`model.high_res_vision_model.vision_encoder.*`, `model.high_res_vision_{neck,proj,alpha}`,
`model.aligner.{vision_proj,high_res_vision_proj,proj}`).
"""
from __future__ import annotations

from dataclasses import dataclass

from dsgraph.errors import ConfigError

SAM = "model.high_res_vision_model.vision_encoder"


@dataclass
class SamConfig:
    hidden_size: int
    output_channels: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    window_size: int
    global_attn_indexes: tuple[int, ...]
    mlp_dim: int
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    use_abs_pos: bool = True

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def sam_from_hf(vc: dict, source: str) -> SamConfig:
    """`high_res_vision_config` (SamVisionConfig; its defaults are SAM ViT-B at 1024 pixels)."""
    if not vc.get("use_rel_pos", True):
        raise ConfigError(f"{source}: high_res_vision_config use_rel_pos=false is not supported (DeepSeek-VL's SAM "
                          "uses relative positions)")
    if vc.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{source}: high_res_vision_config hidden_act {vc['hidden_act']!r} is not 'gelu'")
    d = vc.get("hidden_size", 768)
    glob = tuple(vc.get("global_attn_indexes", (2, 5, 8, 11)))
    layers = vc.get("num_hidden_layers", 12)
    if not glob or not all(0 <= i < layers for i in glob):
        raise ConfigError(f"{source}: high_res_vision_config global_attn_indexes {list(glob)} must name at least one "
                          f"of its {layers} layers (the hybrid model reads the first global block's output)")
    return SamConfig(d, vc.get("output_channels", 256), layers, vc.get("num_attention_heads", 12),
                     vc.get("image_size", 1024), vc.get("patch_size", 16), vc.get("window_size", 14), glob,
                     vc.get("mlp_dim") or int(d * vc.get("mlp_ratio", 4.0)), vc.get("layer_norm_eps", 1e-6),
                     vc.get("qkv_bias", True), vc.get("use_abs_pos", True))


def _linear(b, x, prefix: str, out_f: int, in_f: int, bias: bool = True):
    y = b.linear(x, b.param(f"{prefix}.weight", (out_f, in_f)))
    return b.add(y, b.param(f"{prefix}.bias", (out_f,))) if bias else y


def _layer_norm(b, x, prefix: str, dim: int, eps: float):
    return b.norm.layer(x, b.param(f"{prefix}.weight", (dim,)), b.param(f"{prefix}.bias", (dim,)), eps=eps)


def _rel_table(b, prefix: str, side: int, hd: int):
    """[side, side, hd]: the embedding of offset qy - ky for every (query, key) row of a side x side grid."""
    idx = tuple(q - k + side - 1 for q in range(side) for k in range(side))
    rows = b.index_select(b.param(prefix, (2 * side - 1, hd)),
                          b.constant(value=idx, shape=(side * side,), dtype="int64"), dim=0)
    return b.reshape(rows, shape=(side, side, hd))


def _attention(b, x, s: SamConfig, p: str, side: int):
    """x [M, side, side, D] -> [M, side, side, D]."""
    m, d, heads = x.shape[0], s.hidden_size, s.num_attention_heads
    hd = d // heads
    qkv = b.reshape(_linear(b, x, f"{p}.qkv", 3 * d, d, s.qkv_bias), shape=(m, side * side, 3, heads, hd))
    q, k, v = (b.reshape(b.slice(qkv, dim=2, start=i, end=i + 1), shape=(m, side * side, heads, hd))
               for i in range(3))
    o = b.attention.rel_pos(q, k, v, _rel_table(b, f"{p}.rel_pos_h", side, hd),
                            _rel_table(b, f"{p}.rel_pos_w", side, hd), scale=hd ** -0.5)
    return _linear(b, b.reshape(o, shape=(m, side, side, d)), f"{p}.proj", d, d)


def _block(b, h, s: SamConfig, p: str, window: int):
    n, g, d = h.shape[0], s.grid, s.hidden_size
    x = _layer_norm(b, h, f"{p}.layer_norm1", d, s.layer_norm_eps)
    if window:
        o = _attention(b, b.vision.window_partition(x, window=window), s, f"{p}.attn", window)
        side = -(-g // window)
        o = b.permute(b.reshape(o, shape=(n, side, side, window, window, d)), dims=(0, 1, 3, 2, 4, 5))
        o = b.reshape(o, shape=(n, side * window, side * window, d))
        if side * window != g:   # drop the padding
            o = b.slice(b.slice(o, dim=1, start=0, end=g), dim=2, start=0, end=g)
    else:
        o = _attention(b, x, s, f"{p}.attn", g)
    h = b.add(h, o, name="h_attn")
    x = _layer_norm(b, h, f"{p}.layer_norm2", d, s.layer_norm_eps)
    mlp = b.mlp.gelu(x, b.param(f"{p}.mlp.lin1.weight", (s.mlp_dim, d)), b.param(f"{p}.mlp.lin1.bias", (s.mlp_dim,)),
                     b.param(f"{p}.mlp.lin2.weight", (d, s.mlp_dim)), b.param(f"{p}.mlp.lin2.bias", (d,)),
                     approximate="none")
    return b.add(h, mlp, name="h")


def _channels_first_norm(b, x, prefix: str, c: int):
    y = _layer_norm(b, b.permute(x, dims=(0, 2, 3, 1)), prefix, c, 1e-6)
    return b.permute(y, dims=(0, 3, 1, 2))


def _neck(b, h, p: str, s: SamConfig):
    """[N, g, g, D] -> [N, C, g, g]."""
    c = s.output_channels
    x = b.conv2d(b.permute(h, dims=(0, 3, 1, 2)), b.param(f"{p}.conv1.weight", (c, s.hidden_size, 1, 1)))
    x = _channels_first_norm(b, x, f"{p}.layer_norm1", c)
    x = b.conv2d(x, b.param(f"{p}.conv2.weight", (c, c, 3, 3)), padding=1)
    return _channels_first_norm(b, x, f"{p}.layer_norm2", c)


def _project(b, x, c: int, out: int):
    """[N, C, g, g] -> [N, 4C, out, out]: resize to 4 * out, two stride-2 convs."""
    p = "model.high_res_vision_proj"
    x = b.vision.resize(x, height=4 * out, width=4 * out)
    x = b.conv2d(x, b.param(f"{p}.conv1.weight", (2 * c, c, 3, 3)), stride=2, padding=1)
    return b.conv2d(x, b.param(f"{p}.conv2.weight", (4 * c, 2 * c, 3, 3)), stride=2, padding=1)


def sam_features(b, px, s: SamConfig, out: int):
    """high_res_pixel_values [N, 3, S, S] -> [N, out * out, 4 * output_channels]."""
    g, d, c = s.grid, s.hidden_size, s.output_channels
    n = px.shape[0]
    h = b.vision.patch_embed(px, b.param(f"{SAM}.patch_embed.projection.weight", (d, 3, s.patch_size, s.patch_size)),
                             b.param(f"{SAM}.patch_embed.projection.bias", (d,)), name="sam_patches")
    h = b.reshape(h, shape=(n, g, g, d))
    if s.use_abs_pos:
        h = b.add(h, b.param(f"{SAM}.pos_embed", (1, g, g, d)), name="sam_embed")
    first_global = None
    for i in range(s.num_hidden_layers):
        with b.scope(f"S{i}"):
            h = _block(b, h, s, f"{SAM}.layers.{i}", 0 if i in s.global_attn_indexes else s.window_size)
        if i == s.global_attn_indexes[0]:
            first_global = h
    with b.scope("sam_out"):
        last = _project(b, _neck(b, h, f"{SAM}.neck", s), c, out)
        glob = _project(b, _neck(b, first_global, "model.high_res_vision_neck", s), c, out)
        y = b.add(last, b.mul(glob, b.param("model.high_res_vision_alpha", (1,))))
    return b.reshape(b.permute(y, dims=(0, 2, 3, 1)), shape=(n, out * out, 4 * c))


def hybrid_aligner(b, low, high, vision_dim: int, high_dim: int, text_dim: int):
    """SigLIP [N, T, Dv] and SAM [N, T, 4C] features -> [N, T, D]."""
    p, half = "model.aligner", text_dim // 2
    x = b.concat(_linear(b, high, f"{p}.high_res_vision_proj", half, high_dim),
                 _linear(b, low, f"{p}.vision_proj", half, vision_dim), dim=-1)
    return _linear(b, b.gelu(x, approximate="none"), f"{p}.proj", text_dim, text_dim)
