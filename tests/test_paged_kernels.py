"""The triton MLA decode kernel's block-table path (a paged latent cache) against its contiguous path on random
ragged batches, in fp32 on the interpreter (tests/conftest.py), and its argument checks."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first triton import, also when run without conftest
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsgraph.backends.triton.kernels.mla_decode import MLAConfig, mla_absorbed  # noqa: E402

from dsgraph.errors import InputError  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _paged_case(lens, page, c, r, seed):
    """A pool of random blocks, each request's blocks a random choice of it, and the contiguous caches they make."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = max(-(-n // page) for n in lens)
    pool = torch.randn(len(lens) * n_blocks + 3, page, c + r, generator=g).to(DEV)
    table = torch.randperm(pool.shape[0], generator=g)[:len(lens) * n_blocks].view(len(lens), n_blocks).to(DEV)
    contiguous = pool[table].flatten(1, 2)          # [B, n_blocks * page, C+R]
    return pool, table.to(torch.int32), contiguous, torch.tensor(lens, dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("s,splits", [(1, 1), (1, 3), (2, 2)])
def test_block_table_path_equals_contiguous_path(s, splits):
    c, r, h, page = 32, 8, 4, 8
    pool, table, contiguous, lens = _paged_case([13, 5, 29], page, c, r, seed=s * 10 + splits)
    q = torch.randn(3, s, h, c + r, generator=torch.Generator().manual_seed(splits)).to(DEV)
    cfg = MLAConfig(16, 16, splits, 1, 1)
    want = mla_absorbed(q, contiguous, 0.2, c, cache_lens=lens, config=cfg)
    got = mla_absorbed(q, pool, 0.2, c, cache_lens=lens, config=cfg, block_table=table)
    assert ((got - want).norm() / want.norm()) < 1e-5
    default = mla_absorbed(q, pool, 0.2, c, cache_lens=lens, block_table=table.long())   # the default launch
    assert ((default - want).norm() / want.norm()) < 1e-5


def test_block_table_errors_are_named():
    pool, table, _, lens = _paged_case([9, 4], 8, 32, 8, seed=0)
    q = torch.randn(2, 1, 4, 40).to(DEV)
    with pytest.raises(InputError, match="cache_lens"):
        mla_absorbed(q, pool, 0.2, 32, block_table=table)
    with pytest.raises(InputError, match="outside the pool"):
        mla_absorbed(q, pool, 0.2, 32, cache_lens=lens, block_table=table + pool.shape[0])
    with pytest.raises(InputError, match="block_table must be"):
        mla_absorbed(q, pool, 0.2, 32, cache_lens=lens, block_table=table[:1])
