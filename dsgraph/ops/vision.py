"""Vision ops for the multimodal DeepSeek models (DeepSeek-VL, Janus): the ViT patch embedding, the GELU MLP of
ViT blocks and aligners, the splice of image features into the token embedding stream; for DeepSeek-VL hybrid's
SAM encoder the window partition, attention with decomposed relative positions and the bilinear resize; for
DeepSeek-VL2 the 2x2 pixel shuffle of the patch grid.

The rest of a SigLIP tower is ops that exist already: `norm.layer`, `attention.gqa` with `causal=False`
(bidirectional multi-head attention), `add` for the learned position embeddings.
"""
from __future__ import annotations

import torch
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


def bilinear_matrix(n_in: int, n_out: int) -> list[list[float]]:
    """[n_out][n_in] weights of 1-D linear interpolation, align_corners=False (torch's: source index
    (i + 0.5) * n_in / n_out - 0.5, clamped at 0; the upper neighbour clamped at the edge)."""
    rows = []
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(src), n_in - 1)
        i1, frac = min(i0 + 1, n_in - 1), src - i0
        row = [0.0] * n_in
        row[i0] += 1.0 - frac
        row[i1] += frac
        rows.append(row)
    return rows


RESIZE = defop("vision.resize", "x", {"height": Attr(int), "width": Attr(int)},
               "Bilinear resize of x [N,C,H,W] to [N,C,height,width], align_corners=False (DeepSeek-VL hybrid's SAM "
               "features brought to the SigLIP grid).", level="domain")


@RESIZE.infer
def _(x, height, width):
    expect_rank(x, 4, "vision.resize x [N, C, H, W]")
    expect_float(x, "vision.resize x")
    expect(all(isinstance(d, int) for d in x.shape[2:]) and height > 0 and width > 0,
           lambda: f"vision.resize: x {x} needs a static H, W and the target {height}x{width} must be positive")
    return TensorType((*x.shape[:2], height, width), x.dtype)


@RESIZE.reference
def _(x, height, width):
    return F.interpolate(f32(x), size=(height, width), mode="bilinear", align_corners=False)


@RESIZE.decomposition
def _(b, x, height, width):
    """Separable: A_h @ x @ A_w^T with the interpolation matrices as constants."""
    h, w = x.shape[2], x.shape[3]
    ah = b.constant(value=tuple(v for r in bilinear_matrix(h, height) for v in r), shape=(height, h), dtype=x.dtype)
    awt = b.permute(b.constant(value=tuple(v for r in bilinear_matrix(w, width) for v in r), shape=(width, w),
                               dtype=x.dtype), dims=(1, 0))
    return b.matmul(b.matmul(ah, x), awt)


WINDOWS = defop("vision.window_partition", "x", {"window": Attr(int)},
                "SAM's window partition: x [N,H,W,C] zero-padded at the bottom and right to multiples of `window`, "
                "cut into [N * (H'/window) * (W'/window), window, window, C] (row-major windows).", level="domain")


@WINDOWS.infer
def _(x, window):
    expect_rank(x, 4, "vision.window_partition x [N, H, W, C]")
    h, w = x.shape[1], x.shape[2]
    expect(isinstance(h, int) and isinstance(w, int) and window > 0,
           lambda: f"vision.window_partition: x {x} needs a static H, W and a positive window")
    count = (-(-h // window)) * (-(-w // window))
    return TensorType((x.shape[0] * count, window, window, x.shape[3]), x.dtype)


@WINDOWS.reference
def _(x, window):
    n, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, -w % window, 0, -h % window))
    gh, gw = x.shape[1] // window, x.shape[2] // window
    return x.reshape(n, gh, window, gw, window, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


@WINDOWS.decomposition
def _(b, x, window):
    n, h, w, c = x.shape
    ph, pw = -h % window, -w % window
    if pw:
        x = b.concat(x, b.expand(b.constant(value=0.0, shape=(1, 1, 1, 1), dtype=x.dtype), shape=(n, h, pw, c)), dim=2)
    if ph:
        x = b.concat(x, b.expand(b.constant(value=0.0, shape=(1, 1, 1, 1), dtype=x.dtype), shape=(n, ph, w + pw, c)),
                     dim=1)
    gh, gw = (h + ph) // window, (w + pw) // window
    x = b.permute(b.reshape(x, shape=(n, gh, window, gw, window, c)), dims=(0, 1, 3, 2, 4, 5))
    return b.reshape(x, shape=(n * gh * gw, window, window, c))


REL_POS = defop("attention.rel_pos", "q k v rel_h rel_w", {"scale": Attr(float)},
                "SAM's bidirectional attention with decomposed relative positions over a gh x gw grid: q, k, v "
                "[N, gh*gw, heads, d]; rel_h [gh, gh, d] and rel_w [gw, gw, d] the embeddings of each (query, key) "
                "row and column offset; logits = scale * q.k + q.rel_h[qy, ky] + q.rel_w[qx, kx].", level="domain")


@REL_POS.infer
def _(q, k, v, rh, rw, scale):
    for t, what in ((q, "q"), (k, "k"), (v, "v")):
        expect_rank(t, 4, f"attention.rel_pos {what} [N, T, heads, d]")
    gh, gw, d = rh.shape[0], rw.shape[0], q.shape[3]
    expect(rh.shape == (gh, gh, d) and rw.shape == (gw, gw, d),
           lambda: f"attention.rel_pos: rel_h {rh} / rel_w {rw} must be [gh, gh, {d}] / [gw, gw, {d}]")
    expect(q.shape == k.shape and k.shape[:3] == v.shape[:3] and q.shape[1] == gh * gw,
           lambda: f"attention.rel_pos: q {q}, k {k}, v {v} must be [N, {gh}*{gw}, heads, d] alike")
    same_dtype(q, k, v, rh, rw)
    return v


def _rel_bias(q, rh, rw):
    n, _, heads, d = q.shape
    gh, gw = rh.shape[0], rw.shape[0]
    grid = q.reshape(n, gh, gw, heads, d)
    bh = torch.einsum("nyxhd,ykd->nhyxk", grid, rh)
    bw = torch.einsum("nyxhd,xkd->nhyxk", grid, rw)
    return (bh[..., :, None] + bw[..., None, :]).reshape(n, heads, gh * gw, gh * gw)


@REL_POS.reference
def _(q, k, v, rh, rw, scale):
    q, k, v, rh, rw = (f32(t) for t in (q, k, v, rh, rw))
    logits = torch.einsum("nqhd,nkhd->nhqk", q * scale, k) + _rel_bias(q, rh, rw)
    return torch.einsum("nhqk,nkhd->nqhd", torch.softmax(logits, -1), v)


@REL_POS.decomposition
def _(b, q, k, v, rh, rw, scale):
    n, t, heads, d = q.shape
    gh, gw = rh.shape[0], rw.shape[0]
    grid = b.reshape(q, shape=(n, gh, gw, heads, d))
    bh = b.reshape(b.einsum(grid, rh, equation="nyxhd,ykd->nhyxk"), shape=(n, heads, gh, gw, gh, 1))
    bw = b.reshape(b.einsum(grid, rw, equation="nyxhd,xkd->nhyxk"), shape=(n, heads, gh, gw, 1, gw))
    bias = b.reshape(b.add(bh, bw), shape=(n, heads, t, t))
    qs = b.mul(q, b.constant(value=scale, dtype=q.dtype))
    logits = b.add(b.einsum(qs, k, equation="nqhd,nkhd->nhqk"), bias)
    return b.einsum(b.cast(b.softmax(logits, dim=-1), dtype=q.dtype), v, equation="nhqk,nkhd->nqhd")


SHUFFLE = defop("vision.pixel_shuffle", "x", {"ratio": Attr(int, 2)},
                "DeepSeek-VL2's token downsampling: x [N, g*g, C] as a g x g grid, zero-padded at the bottom and "
                "right to a multiple of `ratio`, each ratio x ratio block concatenated into one token -> "
                "[N, (g'/r)^2, C*r*r], row-major blocks, features channel-major (c*r*r + dy*r + dx: F.unfold's "
                "order, which the projector's first linear was trained on).", level="domain")


def _grid(t: TensorType, ratio: int) -> tuple[int, int]:
    """(side g, padded side g') of the square token grid of x [N, g*g, C]."""
    n = t.shape[1]
    g = int(round(n ** 0.5)) if isinstance(n, int) else 0
    expect(g * g == n and g > 0 and ratio > 0,
           lambda: f"vision.pixel_shuffle: {t} must hold a static square grid of tokens and ratio {ratio} be positive")
    return g, -(-g // ratio) * ratio


@SHUFFLE.infer
def _(x, ratio):
    expect_rank(x, 3, "vision.pixel_shuffle x [N, tokens, C]")
    expect_float(x, "vision.pixel_shuffle x")
    _, gp = _grid(x, ratio)
    c = x.shape[2]
    return TensorType((x.shape[0], (gp // ratio) ** 2, c * ratio * ratio if isinstance(c, int) else c), x.dtype)


@SHUFFLE.reference
def _(x, ratio):
    n, t, c = x.shape
    g = int(round(t ** 0.5))
    grid = F.pad(f32(x).reshape(n, g, g, c), (0, 0, 0, -g % ratio, 0, -g % ratio)).permute(0, 3, 1, 2)
    return F.unfold(grid, kernel_size=ratio, stride=ratio).transpose(1, 2)


@SHUFFLE.decomposition
def _(b, x, ratio):
    n, _, c = x.shape
    g, gp = _grid(x, ratio)
    grid = b.reshape(x, shape=(n, g, g, c))
    if gp != g:
        zero = b.constant(value=0.0, shape=(1, 1, 1, 1), dtype=x.dtype)
        grid = b.concat(grid, b.expand(zero, shape=(n, g, gp - g, c)), dim=2)
        grid = b.concat(grid, b.expand(zero, shape=(n, gp - g, gp, c)), dim=1)
    k = gp // ratio
    blocks = b.permute(b.reshape(grid, shape=(n, k, ratio, k, ratio, c)), dims=(0, 1, 3, 5, 2, 4))
    return b.reshape(blocks, shape=(n, k * k, c * ratio * ratio))
