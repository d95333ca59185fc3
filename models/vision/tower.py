"""The multimodal graphs: a SigLIP vision tower + aligner (one graph, run once per image in prefill) and the
LLaMA-shape decoder whose token embeddings take the image features at the `<image>` placeholder positions.

Vision graph: input pixel_values [N, C, H, W] (N images, already preprocessed), output image_features
[N * patches, D_text] in image order. Decoder graph: DecoderBuilder's interface plus the input
image_features [I, D_text] (I = 0 on decode steps), spliced by `vision.splice`. Param names are the hub keys
(`model.vision_model.*`, `model.aligner.*`); the decoder's are DecoderBuilder's (`model.layers.*`), which the
loader maps from the hub's `model.language_model.*`.
"""
from __future__ import annotations

from dsgraph.builder import GraphBuilder

from ..builder import DecoderBuilder
from .config import VLConfig
from .sam import hybrid_aligner, sam_features


class VLDecoderBuilder(DecoderBuilder):
    """DecoderBuilder with the image-feature splice after the token embedding."""

    def __init__(self, vl: VLConfig, dtype: str = "float32", name: str = "model"):
        super().__init__(vl.text, dtype, name=name, mtp=False)
        self.vl = vl

    def embed_tokens(self, ids, table):
        h = super().embed_tokens(ids, table)
        feats = self.b.input("image_features", ("I", self.cfg.hidden_size), self.dtype)
        return self.b.vision.splice(h, ids, feats, token_id=self.vl.image_token_id, name="embed_mm")

    def build(self):
        g = super().build()
        g.meta.update(image_token_id=self.vl.image_token_id, image_tokens=self.vl.image_tokens)   # None: per image
        return g


def _linear(b, x, prefix: str, out_f: int, in_f: int):
    """linear + bias add, as DecoderBuilder spells biased projections (what merge_qkv matches)."""
    return b.add(b.linear(x, b.param(f"{prefix}.weight", (out_f, in_f))), b.param(f"{prefix}.bias", (out_f,)))


def _layer_norm(b, x, prefix: str, dim: int, eps: float):
    return b.norm.layer(x, b.param(f"{prefix}.weight", (dim,)), b.param(f"{prefix}.bias", (dim,)), eps=eps)


def _block(b, h, vl: VLConfig, p: str):
    v = vl.vision
    d, heads, n, t = v.hidden_size, v.num_attention_heads, h.shape[0], v.num_patches
    hd = d // heads
    x = _layer_norm(b, h, f"{p}.layer_norm1", d, v.layer_norm_eps)
    q, k, val = (b.reshape(_linear(b, x, f"{p}.self_attn.{w}_proj", d, d), shape=(n, t, heads, hd), name=w)
                 for w in ("q", "k", "v"))
    o = b.attention.gqa(q, k, val, scale=hd ** -0.5, causal=False)
    h = b.add(h, _linear(b, b.reshape(o, shape=(n, t, d)), f"{p}.self_attn.{vl.out_proj}", d, d), name="h_attn")
    x = _layer_norm(b, h, f"{p}.layer_norm2", d, v.layer_norm_eps)
    mlp = b.mlp.gelu(x, b.param(f"{p}.mlp.fc1.weight", (v.intermediate_size, d)),
                     b.param(f"{p}.mlp.fc1.bias", (v.intermediate_size,)),
                     b.param(f"{p}.mlp.fc2.weight", (d, v.intermediate_size)), b.param(f"{p}.mlp.fc2.bias", (d,)),
                     approximate=v.gelu)
    return b.add(h, mlp, name="h")


def aligner(b, x, names, dims, gelu: str):
    """Linears `names` (widths dims[0] -> dims[1] -> ...) with a GELU between consecutive ones: pairs through
    mlp.gelu, a GELU before each further pair, an odd last linear alone."""
    for i in range(0, len(names), 2):
        if i:
            x = b.gelu(x, approximate=gelu)
        if i + 1 < len(names):
            x = b.mlp.gelu(x, b.param(f"{names[i]}.weight", (dims[i + 1], dims[i])),
                           b.param(f"{names[i]}.bias", (dims[i + 1],)),
                           b.param(f"{names[i + 1]}.weight", (dims[i + 2], dims[i + 1])),
                           b.param(f"{names[i + 1]}.bias", (dims[i + 2],)), approximate=gelu)
        else:
            x = _linear(b, x, names[i], dims[i + 1], dims[i])
    return x


def build_vision_graph(vl: VLConfig, dtype: str = "float32", name: str = "vision"):
    """pixel_values [N, C, H, W] (and the hybrid's high_res_pixel_values [N, 3, S, S]) -> image_features
    [N * patches, D_text] (see the module doc)."""
    v, b = vl.vision, GraphBuilder(name, dtype)
    p, t = vl.vision_prefix, v.num_patches
    px = b.input("pixel_values", ("N", v.num_channels, v.image_size, v.image_size), dtype)
    pe = f"{p}.embeddings"
    h = b.vision.patch_embed(px, b.param(f"{pe}.patch_embedding.weight",
                                         (v.hidden_size, v.num_channels, v.patch_size, v.patch_size)),
                             b.param(f"{pe}.patch_embedding.bias", (v.hidden_size,)), name="patches")
    h = b.add(h, b.param(f"{pe}.position_embedding.weight", (t, v.hidden_size)), name="embed")
    for i in range(v.num_hidden_layers):
        with b.scope(f"V{i}"):
            h = _block(b, h, vl, f"{p}.encoder.layers.{i}")
    h = _layer_norm(b, h, f"{p}.post_layernorm", v.hidden_size, v.layer_norm_eps)
    if vl.high_res is not None:   # DeepSeek-VL hybrid: SAM on the high-resolution pixels, joined by its aligner
        s = vl.high_res
        hi = b.input("high_res_pixel_values", ("N", 3, s.image_size, s.image_size), dtype)
        high = sam_features(b, hi, s, v.image_size // v.patch_size)
        with b.scope("aligner"):
            h = hybrid_aligner(b, h, high, *vl.aligner_dims[:2], vl.text.hidden_size)
    else:
        with b.scope("aligner"):
            h = aligner(b, h, vl.aligner, vl.aligner_dims, vl.aligner_gelu)
    b.output("image_features", b.reshape(h, shape=(h.shape[0] * t, vl.text.hidden_size), name="image_features"))
    g = b.build()
    g.meta.update(family="vision", model_type=vl.model_type, config=vl.to_dict(), image_tokens=t)
    return g


def build_vl_graphs(vl: VLConfig, dtype: str = "float32", name: str = "model"):
    """(decoder graph, vision graph) of a multimodal model."""
    return VLDecoderBuilder(vl, dtype, name=name).build(), build_vision_graph(vl, dtype, name=f"{name}_vision")
