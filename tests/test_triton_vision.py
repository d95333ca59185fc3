"""The vision towers' Triton kernels and data-movement lowerings against their ops' references on fresh random
inputs: SAM's relative-position attention (a full and a ragged key tile, a head dim that is no power of two,
q/k/v strided views of one qkv tensor) and GroupNorm (a group longer than one block) in fp32 and fp16 on the
interpreter (GroupNorm, which has no tl.dot, in bf16 too), bf16 at SAM ViT-B's and the VQ decoder's shapes on
CUDA (`-m gpu`); the window partition, pixel shuffle and splice exactly equal to the references."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsgraph.backends.triton.kernels.group_norm import group_norm  # noqa: E402
from dsgraph.backends.triton.kernels.rel_pos_attention import rel_pos_attention  # noqa: E402
from dsgraph.backends.triton.lowering import vision  # noqa: E402

from dsgraph.errors import ShapeError  # noqa: E402
from dsgraph.numerics import rel_err  # noqa: E402
from dsgraph.ops.registry import get_op  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel_pos_inputs(n, gh, gw, heads, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, gh * gw, 3, heads, d, generator=g)   # q, k, v: strided views, as the SAM graph slices them
    tables = torch.randn(gh, gh, d, generator=g) * 0.3, torch.randn(gw, gw, d, generator=g) * 0.3
    qkv = qkv.to(DEV, dtype)
    return (*qkv.unbind(2), *(t.to(DEV, dtype) for t in tables))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_rel_pos_attention_equals_the_reference(dtype, tol):
    args = _rel_pos_inputs(2, 4, 5, 2, 24, dtype)   # 20 keys: one full 16-key tile and a ragged one
    want = get_op("attention.rel_pos").reference_fn(*args, scale=24 ** -0.5)
    got = rel_pos_attention(*args, 24 ** -0.5)
    assert got.dtype == dtype and got.shape == args[0].shape
    assert rel_err(got, want) <= tol
    with pytest.raises(ShapeError, match="gh \\* gw = 20"):
        rel_pos_attention(*args[:3], args[3][:3, :3], args[4], 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,side", [(25, 14), (1, 64)])   # ViT-B at 1024 px: 5x5 windows of 14x14, global 64x64
def test_rel_pos_attention_bf16_gpu(n, side):
    args = _rel_pos_inputs(n, side, side, 12, 64, torch.bfloat16)
    ref = get_op("attention.rel_pos").reference_fn
    want = ref(*(a.float() for a in args), scale=0.125)
    torch_bf16 = rel_err(ref(*args, scale=0.125).bfloat16(), want)
    assert rel_err(rel_pos_attention(*args, 0.125), want) <= max(2 * torch_bf16, 1e-2)


@pytest.mark.parametrize("dtype,shape,groups,tol", [(torch.float32, (1, 4, 48, 48), 2, 1e-5),
                                                    (torch.float16, (2, 8, 5, 7), 4, 2e-3),
                                                    (torch.bfloat16, (2, 8, 5, 7), 4, 1e-2)])
def test_group_norm_equals_the_reference(dtype, shape, groups, tol):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3 + 5).to(DEV, dtype)   # an offset mean: the two-pass variance
    w, b = (torch.randn(shape[1], generator=g).to(DEV, dtype) for _ in range(2))
    got = group_norm(x, w, b, groups, 1e-6)
    assert got.dtype == dtype and rel_err(got, get_op("norm.group").reference_fn(x, w, b, groups, 1e-6)) <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_group_norm_bf16_gpu():
    """The VQ decoder's widest norm at 384 px output: 128 channels in 32 groups over 384 x 384."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 128, 384, 384, generator=g) * 2 + 1).to(DEV, torch.bfloat16)
    w, b = (torch.randn(128, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    want = get_op("norm.group").reference_fn(x, w, b, 32, 1e-6)
    assert rel_err(group_norm(x, w, b, 32, 1e-6), want) <= 2 * rel_err(want.bfloat16(), want) + 1e-3


def test_data_movement_equals_the_references():
    """Padded and unpadded grids; a splice with more placeholders than features, and one with none (decode)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 7, 3, generator=g).half()
    for window in (3, 5):
        want = get_op("vision.window_partition").reference_fn(x, window=window)
        assert torch.equal(vision.window_partition(x, window), want.half())
    tokens = torch.randn(2, 25, 4, generator=g).half()
    for grid in (tokens, tokens[:, :16]):
        want = get_op("vision.pixel_shuffle").reference_fn(grid, ratio=2)
        assert torch.equal(vision.pixel_shuffle(grid, 2), want.half())
    embeds, feats = torch.randn(2, 6, 4, generator=g).half(), torch.randn(3, 4, generator=g).half()
    ids = torch.tensor([[1, 9, 9, 2, 9, 3], [9, 9, 4, 5, 6, 7]])
    for f in (feats, feats[:0]):
        want = get_op("vision.splice").reference_fn(embeds, ids, f, token_id=9)
        assert torch.equal(vision.splice(embeds, ids, f, 9), want.half())
