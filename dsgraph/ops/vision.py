"""Vision ops for the multimodal DeepSeek models (DeepSeek-VL, Janus): the ViT patch embedding, the GELU MLP of
ViT blocks and aligners, and the splice of image features into the token embedding stream.

The rest of a SigLIP tower is ops that exist already: `norm.layer`, `attention.gqa` with `causal=False`
(bidirectional multi-head attention), `add` for the learned position embeddings.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..types import TensorType
from .common import expect_float, expect_int, expect_rank, f32, same_dtype
from .registry import Attr, defop, expect

PATCH = defop("vision.patch_embed", "pixels weight bias", {},
              "ViT patch embedding: conv2d with kernel = stride = patch over pixels [N,C,H,W], weight [D,C,p,p], "
              "flattened row-major over the patch grid -> [N, (H/p)*(W/p), D].", level="domain")


@PATCH.infer
def _(x, w, bias):
    expect_rank(x, 4, "vision.patch_embed pixels [N, C, H, W]")
    expect_rank(w, 4, "vision.patch_embed weight [D, C, p, p]")
    expect_float(x, "vision.patch_embed pixels")
    same_dtype(x, w, bias)
    d, c, p, p2 = w.shape
    h, wd = x.shape[2], x.shape[3]
    expect(p == p2 and x.shape[1] == c, lambda: f"vision.patch_embed: weight {w} does not fit pixels {x}")
    expect(isinstance(h, int) and isinstance(wd, int) and h % p == 0 and wd % p == 0,
           lambda: f"vision.patch_embed: image {h}x{wd} is not a whole number of {p}-pixel patches; resize it")
    expect(bias.shape == (d,), lambda: f"vision.patch_embed: bias must be [{d}], got {bias}")
    return TensorType((x.shape[0], (h // p) * (wd // p), d), x.dtype)


@PATCH.reference
def _(x, w, bias):
    y = F.conv2d(f32(x), f32(w), f32(bias), stride=w.shape[-1])
    return y.flatten(2).transpose(1, 2)


@PATCH.decomposition
def _(b, x, w, bias):
    d, c, p, _ = w.shape
    gh, gw = x.shape[2] // p, x.shape[3] // p
    n = x.shape[0]
    tiles = b.reshape(x, shape=(n, c, gh, p, gw, p))
    tiles = b.reshape(b.permute(tiles, dims=(0, 2, 4, 1, 3, 5)), shape=(n, gh * gw, c * p * p))
    return b.linear(tiles, b.reshape(w, shape=(d, c * p * p)), bias)


GELU_MLP = defop("mlp.gelu", "x fc1_weight fc1_bias fc2_weight fc2_bias",
                 {"approximate": Attr(str, "none", ("none", "tanh"))},
                 "ViT / aligner MLP: fc2(gelu(fc1(x))), both linears with bias; SigLIP uses the tanh GELU, "
                 "DeepSeek-VL's aligner the exact one.", level="domain")


@GELU_MLP.infer
def _(x, w1, b1, w2, b2, approximate):
    expect_float(x, "mlp.gelu input")
    expect(w1.rank == 2 and w1.shape[1] == x.shape[-1], lambda: f"mlp.gelu: fc1 {w1} must be [I, {x.shape[-1]}]")
    expect(w2.rank == 2 and w2.shape[1] == w1.shape[0], lambda: f"mlp.gelu: fc2 {w2} must be [O, {w1.shape[0]}]")
    expect(b1.shape == (w1.shape[0],) and b2.shape == (w2.shape[0],),
           lambda: f"mlp.gelu: biases {b1}, {b2} must be [{w1.shape[0]}], [{w2.shape[0]}]")
    same_dtype(x, w1, b1, w2, b2)
    return TensorType(x.shape[:-1] + (w2.shape[0],), x.dtype)


@GELU_MLP.reference
def _(x, w1, b1, w2, b2, approximate):
    h = F.gelu(F.linear(f32(x), f32(w1), f32(b1)), approximate=approximate)
    return F.linear(h, f32(w2), f32(b2))


@GELU_MLP.decomposition
def _(b, x, w1, b1, w2, b2, approximate):
    return b.linear(b.gelu(b.linear(x, w1, b1), approximate=approximate), w2, b2)


SPLICE = defop("vision.splice", "embeds ids features", {"token_id": Attr(int)},
               "Image features into the token stream: the k-th position (row-major) of ids == token_id takes "
               "features[k] ([I, D]) for k < I; every other position keeps embeds [B,S,D]. With I = 0 (decode "
               "steps: a generated token may equal the placeholder id) nothing changes; that the prompt's "
               "placeholders match the images is the runtime's check.", level="domain")


@SPLICE.infer
def _(e, ids, feats, token_id):
    expect_rank(e, 3, "vision.splice embeds [B, S, D]")
    expect_int(ids, "vision.splice ids")
    expect(ids.shape == e.shape[:2], lambda: f"vision.splice: ids {ids} do not match embeds {e}")
    expect(feats.rank == 2 and feats.shape[1] == e.shape[2],
           lambda: f"vision.splice: features {feats} must be [I, {e.shape[2]}]")
    same_dtype(e, feats)
    return e


@SPLICE.reference
def _(e, ids, feats, token_id):
    mask = (ids == token_id).flatten()
    mask &= mask.cumsum(0) <= feats.shape[0]
    out = f32(e).clone().flatten(0, 1)
    out[mask] = f32(feats[:int(mask.sum())])
    return out.reshape(e.shape)


@SPLICE.decomposition
def _(b, e, ids, feats, token_id):
    """Row k of [0 | features] for the k-th placeholder (a running count, kept while k <= I), row 0 elsewhere:
    one gather, one select."""
    flat = b.reshape(ids, shape=(ids.shape[0] * ids.shape[1],))
    hit = b.cast(b.eq(flat, b.constant(value=token_id, dtype=ids.dtype)), dtype="int64")
    rank = b.cumsum(hit, dim=0)
    count = b.sum(b.cast(b.ge(b.arange_like(feats, dim=0), b.constant(value=0, dtype="int64")), dtype="int64"),
                  dims=(0,))
    keep = b.mul(hit, b.cast(b.le(rank, count), dtype="int64"))
    padded = b.concat(b.constant(value=0.0, shape=(1, e.shape[2]), dtype=e.dtype), feats, dim=0)
    picked = b.reshape(b.index_select(padded, b.mul(rank, keep), dim=0), shape=e.shape)
    mask = b.reshape(b.cast(keep, dtype="bool"), shape=(*ids.shape, 1))
    return b.where(mask, picked, e)


CONV = defop("conv2d", "x weight bias?", {"stride": Attr(int, 1), "padding": Attr(int, 0)},
             "2-D convolution over x [N,C,H,W] with weight [O,C,k,k] (+ bias [O]), square stride and zero padding.")


@CONV.infer
def _(x, w, bias=None, *, stride, padding):
    expect_rank(x, 4, "conv2d x [N, C, H, W]")
    expect_rank(w, 4, "conv2d weight [O, C, k, k]")
    same_dtype(x, w, *([bias] if bias is not None else []))
    o, c, k, k2 = w.shape
    h, wd = x.shape[2], x.shape[3]
    expect(x.shape[1] == c and k == k2, lambda: f"conv2d: weight {w} does not fit x {x}")
    expect(bias is None or bias.shape == (o,), lambda: f"conv2d: bias must be [{o}], got {bias}")
    expect(isinstance(h, int) and isinstance(wd, int) and stride > 0 and h + 2 * padding >= k,
           lambda: f"conv2d: x {x} must have static H, W of at least the kernel {k} with padding {padding}")
    out = [(n + 2 * padding - k) // stride + 1 for n in (h, wd)]
    return TensorType((x.shape[0], o, *out), x.dtype)


@CONV.reference
def _(x, w, bias=None, *, stride, padding):
    return F.conv2d(f32(x), f32(w), None if bias is None else f32(bias), stride=stride, padding=padding)


GROUP = defop("norm.group", "x weight bias", {"groups": Attr(int), "eps": Attr(float, 1e-6)},
              "GroupNorm over x [N,C,...] (channels in `groups` groups, statistics in fp32), per-channel affine.",
              level="domain")


@GROUP.infer
def _(x, w, bias, groups, eps):
    expect_float(x, "norm.group input")
    c = x.shape[1] if x.rank >= 2 else None
    expect(isinstance(c, int) and groups > 0 and c % groups == 0,
           lambda: f"norm.group: {c} channels of {x} do not split into {groups} groups")
    expect(w.shape == (c,) and bias.shape == (c,), lambda: f"norm.group: weight and bias must be [{c}]")
    same_dtype(x, w, bias)
    return x


@GROUP.reference
def _(x, w, bias, groups, eps):
    return F.group_norm(f32(x), groups, f32(w), f32(bias), eps)


@GROUP.decomposition
def _(b, x, w, bias, groups, eps):
    n, c, rest = x.shape[0], x.shape[1], x.shape[2:]
    xf = b.reshape(b.cast(x, dtype="float32"), shape=(n, groups, c // groups, *rest))
    red = tuple(range(2, 2 + 1 + len(rest)))
    centred = b.sub(xf, b.mean(xf, dims=red, keepdim=True))
    var = b.mean(b.mul(centred, centred), dims=red, keepdim=True)
    y = b.reshape(b.mul(centred, b.rsqrt(b.add(var, b.constant(value=eps)))), shape=x.shape)
    affine = (c,) + (1,) * len(rest)
    y = b.add(b.mul(y, b.reshape(b.cast(w, dtype="float32"), shape=affine)),
              b.reshape(b.cast(bias, dtype="float32"), shape=affine))
    return b.cast(y, dtype=x.dtype)
