"""The vision ops of DeepSeek-VL and Janus as library calls on the device: convolutions through cuDNN
(torch.nn.functional.conv2d: the ViT patch embedding is one strided conv), the GELU MLP as two cuBLAS GEMMs around
torch's GELU, GroupNorm through torch (fp32 statistics), the bilinear resize through torch; the image-feature
splice (a masked row copy), SAM's window partition, VL2's pixel shuffle (a pad and a gather of 2x2 blocks) and
SAM's relative-position attention (fp32 einsums and softmax; the flash template takes no additive bias yet) as
the ops' reference code. No Triton template is written for them
yet: at the towers' shapes the GEMMs dominate.
"""
from __future__ import annotations

import torch.nn.functional as F

from dsgraph.dtypes import to_torch
from dsgraph.ops import get_op

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


@TABLE.register("norm.group", "vision.splice", "vision.window_partition", "attention.rel_pos",
                "vision.pixel_shuffle")
def _(ctx, node):
    ref, attrs, dt = get_op(node.op).reference_fn, node.attrs, to_torch(node.outputs[0].dtype)
    return Lowered("library", f"torch ({node.op}'s reference code, on the device)",
                   fn=lambda a, sym: [ref(*a, **attrs).to(dt)])
