"""Janus' VQ decoder (codes -> pixels), VQGAN-style, as a graph: codebook lookup, L2-normalised, on the code grid;
post_quant_conv; conv_in; a middle of ResNet block, attention block, ResNet block; per resolution (widest first)
ResNet blocks (attention blocks at the lowest resolution) and a nearest 2x upsample + conv; GroupNorm, swish,
conv_out. Layout NCHW; GroupNorm has 32 groups, eps 1e-6; the attention block is single-head attention over the
H*W positions (1x1 convs for q, k, v, proj_out), written with attention.gqa (causal=False).

Graph: image_codes [N, grid*grid] int64 -> pixels [N, out_channels, H, W] (values about -1..1). Params are the
hub keys `model.vqmodel.{quantize.embedding, post_quant_conv, decoder.*}`.
"""
from __future__ import annotations

from dsgraph.builder import GraphBuilder

from .config import GenerationConfig

P = "model.vqmodel"


def _conv(b, x, prefix: str, cin: int, cout: int, k: int):
    return b.conv2d(x, b.param(f"{prefix}.weight", (cout, cin, k, k)), b.param(f"{prefix}.bias", (cout,)),
                    padding=k // 2)


def _norm(b, x, prefix: str, c: int):
    return b.norm.group(x, b.param(f"{prefix}.weight", (c,)), b.param(f"{prefix}.bias", (c,)), groups=32, eps=1e-6)


def _resnet(b, x, p: str, cin: int, cout: int):
    h = _conv(b, b.silu(_norm(b, x, f"{p}.norm1", cin)), f"{p}.conv1", cin, cout, 3)
    h = _conv(b, b.silu(_norm(b, h, f"{p}.norm2", cout)), f"{p}.conv2", cout, cout, 3)
    skip = x if cin == cout else _conv(b, x, f"{p}.nin_shortcut", cin, cout, 1)
    return b.add(skip, h)


def _attn(b, x, p: str, c: int, side: int):
    n, hw = x.shape[0], side * side
    h = _norm(b, x, f"{p}.norm", c)
    q, k, v = (b.reshape(b.permute(b.reshape(_conv(b, h, f"{p}.{w}", c, c, 1), shape=(n, c, hw)), dims=(0, 2, 1)),
                         shape=(n, hw, 1, c)) for w in "qkv")
    o = b.attention.gqa(q, k, v, scale=c ** -0.5, causal=False)
    o = b.reshape(b.permute(b.reshape(o, shape=(n, hw, c)), dims=(0, 2, 1)), shape=(n, c, side, side))
    return b.add(x, _conv(b, o, f"{p}.proj_out", c, c, 1))


def _upsample(b, x, p: str, c: int, side: int):
    n = x.shape[0]
    x = b.expand(b.reshape(x, shape=(n, c, side, 1, side, 1)), shape=(n, c, side, 2, side, 2))
    return _conv(b, b.reshape(x, shape=(n, c, 2 * side, 2 * side)), f"{p}.conv", c, c, 3)


def build_vq_decoder_graph(g: GenerationConfig, dtype: str = "float32", name: str = "vq_decoder"):
    b, side = GraphBuilder(name, dtype), g.grid
    codes = b.input("image_codes", ("N", side * side))
    z = b.embed(codes, b.param(f"{P}.quantize.embedding.weight", (g.num_embeddings, g.embed_dim)), name="codes")
    # L2-normalised codebook entries (transformers: F.normalize, eps 1e-12, which only a zero entry would meet)
    z = b.mul(z, b.rsqrt(b.sum(b.mul(z, z), dims=(-1,), keepdim=True)))
    n = z.shape[0]
    z = b.permute(b.reshape(z, shape=(n, side, side, g.embed_dim)), dims=(0, 3, 1, 2))
    h = _conv(b, z, f"{P}.post_quant_conv", g.embed_dim, g.latent_channels, 1)
    d, mult, levels = f"{P}.decoder", g.channel_multiplier, len(g.channel_multiplier)
    c = g.base_channels * mult[-1]
    h = _conv(b, h, f"{d}.conv_in", g.latent_channels, c, 3)
    h = _attn(b, _resnet(b, h, f"{d}.mid.block_1", c, c), f"{d}.mid.attn_1", c, side)
    h = _resnet(b, h, f"{d}.mid.block_2", c, c)
    for i, level in enumerate(reversed(range(levels))):
        out = g.base_channels * mult[level]
        for j in range(g.num_res_blocks + 1):
            with b.scope(f"up{i}.{j}"):
                h, c = _resnet(b, h, f"{d}.up.{i}.block.{j}", c, out), out
                if level == levels - 1:
                    h = _attn(b, h, f"{d}.up.{i}.attn.{j}", c, side)
        if level != 0:
            h, side = _upsample(b, h, f"{d}.up.{i}.upsample", c, side), side * 2
    h = _conv(b, b.silu(_norm(b, h, f"{d}.norm_out", c)), f"{d}.conv_out", c, g.out_channels, 3)
    b.output("pixels", h)
    graph = b.build()
    graph.meta.update(family="vq_decoder", image_size=side)
    return graph
