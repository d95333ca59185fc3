"""DeepSeek-VL2's graphs: the vision graph (SigLIP over every tile, the 2x2 pixel shuffle, the MLP projector and
the tile layout with its newline / separator tokens; run once per prompt's images, in prefill) and the DeepSeekMoE
/ V2 decoder with the image-feature splice (models/vision/tower.py's VLDecoderBuilder).

Vision graph: inputs pixel_values [N, 3, S, S] (N tiles of all images: each image's global view, then its local
tiles) and image_layout [T] (models/vision/tiling.py: 0 newline, 1 separator, 2 + r token row r of the tiles'
features); output image_features [T, D_text], the image tokens in prompt order. Param names are the hub keys
(`vision.*` in timm's layout, `projector.layers.{0,2,..}.*`, `image_newline`, `view_seperator`); the decoder's are
DecoderBuilder's, which the loader maps from `language.model.*` and `language.lm_head.weight`.
"""
from __future__ import annotations

from dsgraph.builder import GraphBuilder

from .tower import VLDecoderBuilder, _layer_norm, _linear, aligner
from .vl2 import VL2Config


def _block(b, h, v, p: str):
    """A timm ViT block: pre-norm fused-qkv attention (bidirectional), pre-norm GELU MLP."""
    d, heads, n, t = v.hidden_size, v.num_attention_heads, h.shape[0], v.num_patches
    x = _layer_norm(b, h, f"{p}.norm1", d, v.layer_norm_eps)
    qkv = b.split(_linear(b, x, f"{p}.attn.qkv", 3 * d, d), sizes=(d, d, d), dim=-1, name="qkv")
    q, k, val = (b.reshape(y, shape=(n, t, heads, d // heads), name=w) for y, w in zip(qkv, "qkv"))
    o = b.attention.gqa(q, k, val, scale=(d // heads) ** -0.5, causal=False)
    h = b.add(h, _linear(b, b.reshape(o, shape=(n, t, d)), f"{p}.attn.proj", d, d), name="h_attn")
    x = _layer_norm(b, h, f"{p}.norm2", d, v.layer_norm_eps)
    mlp = b.mlp.gelu(x, b.param(f"{p}.mlp.fc1.weight", (v.intermediate_size, d)),
                     b.param(f"{p}.mlp.fc1.bias", (v.intermediate_size,)),
                     b.param(f"{p}.mlp.fc2.weight", (d, v.intermediate_size)), b.param(f"{p}.mlp.fc2.bias", (d,)),
                     approximate=v.gelu)
    return b.add(h, mlp, name="h")


def build_vl2_vision_graph(vl: VL2Config, dtype: str = "float32", name: str = "vision"):
    """pixel_values [N, 3, S, S] + image_layout [T] -> image_features [T, D_text] (see the module doc)."""
    v, pc, b = vl.vision, vl.projector, GraphBuilder(name, dtype)
    d, side = vl.text.hidden_size, vl.tile_side
    px = b.input("pixel_values", ("N", v.num_channels, v.image_size, v.image_size), dtype)
    layout = b.input("image_layout", ("T",), "int64")
    edge = v.image_size // v.patch_size * v.patch_size   # SO400M: 27 patches of 14 in 384; the conv drops the rest
    if edge != v.image_size:
        px = b.slice(b.slice(px, dim=2, start=0, end=edge), dim=3, start=0, end=edge, name="whole_patches")
    h = b.vision.patch_embed(px, b.param("vision.patch_embed.proj.weight",
                                         (v.hidden_size, v.num_channels, v.patch_size, v.patch_size)),
                             b.param("vision.patch_embed.proj.bias", (v.hidden_size,)), name="patches")
    h = b.add(h, b.param("vision.pos_embed", (1, v.num_patches, v.hidden_size)), name="embed")
    for i in range(v.num_hidden_layers):
        with b.scope(f"V{i}"):
            h = _block(b, h, v, f"vision.blocks.{i}")
    h = _layer_norm(b, h, "vision.norm", v.hidden_size, v.layer_norm_eps)
    with b.scope("projector"):
        h = b.vision.pixel_shuffle(h, ratio=pc.downsample_ratio, name="shuffled")
        names = tuple(f"projector.layers.{2 * i}" for i in range(pc.depth))   # nn.Sequential: GELUs between
        h = aligner(b, h, names, pc.dims, "none")
    with b.scope("layout"):
        tokens = b.reshape(h, shape=(h.shape[0] * side * side, d), name="tile_tokens")
        table = b.concat(b.reshape(b.param("image_newline", (d,)), shape=(1, d)),
                         b.reshape(b.param("view_seperator", (d,)), shape=(1, d)), tokens, dim=0, name="table")
        b.output("image_features", b.index_select(table, layout, dim=0, name="image_features"))
    g = b.build()
    g.meta.update(family="vision", model_type=vl.model_type, config=vl.to_dict(), image_tokens=None,
                  tile_tokens=side * side)
    return g


def build_vl2_graphs(vl: VL2Config, dtype: str = "float32", name: str = "model"):
    """(decoder graph, vision graph) of DeepSeek-VL2."""
    return VLDecoderBuilder(vl, dtype, name=name).build(), build_vl2_vision_graph(vl, dtype, name=f"{name}_vision")
