"""The MXFP4 weight-only GEMM kernel against dequant_mxfp4's reference + a fp32 matmul: odd M and N, K a multiple
of 32 but not of the 64-wide K block, every nibble and scales around 2**0, in fp32 and fp16."""
from __future__ import annotations

import pytest
import torch

from dsgraph.errors import ShapeError
from dsgraph.numerics import rel_err, tolerance
from dsgraph.ops import get_op

pytest.importorskip("triton")
from dsgraph.backends.triton.kernels.mxfp4 import mxfp4_matmul  # noqa: E402

G = torch.Generator().manual_seed(4)


@pytest.mark.parametrize("m,n,k", [(1, 40, 64), (5, 33, 96), (17, 64, 128), (3, 7, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mxfp4_gemm_matches_reference(m, n, k, dtype):
    w = torch.randint(-128, 128, (n, k // 2), generator=G, dtype=torch.int8)
    s = torch.randint(124, 130, (n, k // 32), generator=G, dtype=torch.uint8)
    x = torch.randn(m, k, generator=G)
    want = x @ get_op("dequant_mxfp4").reference_fn(w, s).T
    got = mxfp4_matmul(x.to(dtype), w, s)
    assert got.dtype == dtype and got.shape == (m, n)
    assert rel_err(got.float(), want) < (1e-5 if dtype == torch.float32 else tolerance("float16"))


def test_every_nibble_decodes():
    codes = torch.arange(16, dtype=torch.uint8)
    w = (codes[0::2] | (codes[1::2] << 4)).view(torch.int8).repeat(1, 2)[None].reshape(1, 16)  # 32 values
    s = torch.full((1, 1), 127, dtype=torch.uint8)
    eye = torch.eye(32)
    got = mxfp4_matmul(eye, w, s)[:, 0]
    assert torch.equal(got, get_op("dequant_mxfp4").reference_fn(w, s)[0])


def test_shapes_are_checked():
    with pytest.raises(ShapeError, match="multiple of 32"):
        mxfp4_matmul(torch.randn(2, 48), torch.zeros(4, 24, dtype=torch.int8), torch.zeros(4, 1, dtype=torch.uint8))
