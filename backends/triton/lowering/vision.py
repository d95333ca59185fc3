"""The vision ops of DeepSeek-VL, VL2 and Janus on the device.

Triton templates: SAM's relative-position attention (kernels/rel_pos_attention.py: flash attention with the
decomposed bias added per score tile) and GroupNorm (kernels/group_norm.py). Library calls: convolutions
through cuDNN (torch.nn.functional.conv2d: the ViT patch embedding is one strided conv), the GELU MLP as two
cuBLAS GEMMs around torch's GELU, the bilinear resize through torch. Data movement as torch views and index
ops, in the tensor's own dtype (exact, so no fp32 round trip): SAM's window partition and VL2's pixel shuffle
are a pad and one permuting copy, the image-feature splice a running count, one row gather and a select (no
host sync, so it can sit in a captured decode step). At the towers' shapes the GEMMs dominate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from dsgraph.backends.lowering import Decline

from ..kernels.group_norm import group_norm
from ..kernels.rel_pos_attention import rel_pos_attention
from .registry import TABLE, Lowered

CUDNN = "torch.nn.functional.conv2d (cuDNN on CUDA)"


@TABLE.register("conv2d")
def _(ctx, node):
    s, p = node.attrs["stride"], node.attrs["padding"]
    return Lowered("library", CUDNN, fn=lambda a, sym: [F.conv2d(a[0], a[1], a[2] if len(a) > 2 else None,
                                                                 stride=s, padding=p)])


@TABLE.register("vision.patch_embed")
def _(ctx, node):
    def run(a, sym):
        return [F.conv2d(a[0], a[1], a[2], stride=a[1].shape[-1]).flatten(2).transpose(1, 2)]
    return Lowered("library", f"{CUDNN}, kernel = stride = patch", fn=run)


@TABLE.register("mlp.gelu")
def _(ctx, node):
    approx = node.attrs["approximate"]
    return Lowered("library", "torch.nn.functional.linear x2 (cuBLAS on CUDA) around torch gelu",
                   fn=lambda a, sym: [F.linear(F.gelu(F.linear(a[0], a[1], a[2]), approximate=approx), a[3], a[4])])


@TABLE.register("vision.resize")
def _(ctx, node):
    size = (node.attrs["height"], node.attrs["width"])
    return Lowered("library", "torch.nn.functional.interpolate (bilinear)",
                   fn=lambda a, sym: [F.interpolate(a[0], size=size, mode="bilinear", align_corners=False)])


@TABLE.register("attention.rel_pos")
def _(ctx, node):
    if ctx.interpreting and node.inputs[0].dtype == "bfloat16":
        return Decline("Triton's interpreter computes bf16 tl.dot wrongly; bf16 SAM attention runs on CUDA")
    scale = node.attrs["scale"]
    return Lowered("template", "rel_pos_attention._rel_pos_attention_kernel (its [T, gh] + [T, gw] bias terms "
                   "from two fp32 einsums)", fn=lambda a, sym: [rel_pos_attention(*a, scale)])


@TABLE.register("norm.group")
def _(ctx, node):
    groups, eps = node.attrs["groups"], node.attrs["eps"]
    return Lowered("template", "group_norm._group_norm_kernel", fn=lambda a, sym: [group_norm(*a, groups, eps)])


def window_partition(x, window: int):
    """[N, H, W, C] -> [N * windows, window, window, C]; the reference's layout, without its fp32 cast."""
    n, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, -w % window, 0, -h % window))
    gh, gw = x.shape[1] // window, x.shape[2] // window
    return x.reshape(n, gh, window, gw, window, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def pixel_shuffle(x, ratio: int):
    """[N, g*g, C] -> [N, (g'/r)^2, C*r*r], features channel-major (c*r*r + dy*r + dx) as F.unfold orders them."""
    n, t, c = x.shape
    g = int(round(t ** 0.5))
    grid = F.pad(x.reshape(n, g, g, c), (0, 0, 0, -g % ratio, 0, -g % ratio))
    k = grid.shape[1] // ratio
    return grid.reshape(n, k, ratio, k, ratio, c).permute(0, 1, 3, 5, 2, 4).reshape(n, k * k, c * ratio * ratio)


def splice(embeds, ids, feats, token_id: int):
    """The k-th placeholder (k < I) takes features[k]: row `rank` of [0 | features] where rank = the running
    count of placeholders, kept while rank <= I; every other row keeps its embedding."""
    hit = (ids == token_id).flatten()
    rank = hit.cumsum(0)
    keep = hit & (rank <= feats.shape[0])
    padded = torch.cat([feats.new_zeros(1, feats.shape[1]), feats])
    picked = padded.index_select(0, rank * keep).reshape(embeds.shape)
    return torch.where(keep.reshape(*ids.shape, 1), picked, embeds)


@TABLE.register("vision.window_partition")
def _(ctx, node):
    window = node.attrs["window"]
    return Lowered("library", "torch pad + reshape/permute (one copy)",
                   fn=lambda a, sym: [window_partition(a[0], window)])


@TABLE.register("vision.pixel_shuffle")
def _(ctx, node):
    ratio = node.attrs["ratio"]
    return Lowered("library", "torch pad + reshape/permute (one copy)",
                   fn=lambda a, sym: [pixel_shuffle(a[0], ratio)])


@TABLE.register("vision.splice")
def _(ctx, node):
    token = node.attrs["token_id"]
    return Lowered("library", "torch cumsum + index_select + where (no host sync)",
                   fn=lambda a, sym: [splice(a[0], a[1], a[2], token)])
