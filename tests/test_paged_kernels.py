"""The triton MLA decode, GQA attention and DSA (indexer, sparse MLA) kernels' block-table path (a paged cache)
against their contiguous path on random ragged batches, in fp32 on the interpreter (tests/conftest.py), and its
argument checks."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first triton import, also when run without conftest
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsgraph.backends.triton.kernels.dsa import indexer_logits, sparse_mla  # noqa: E402
from dsgraph.backends.triton.kernels.flash_attention import FlashConfig, flash_attention  # noqa: E402
from dsgraph.backends.triton.kernels.mla_decode import MLAConfig, mla_absorbed  # noqa: E402

from dsgraph.errors import InputError  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _paged_case(lens, page, row, seed, pools=1):
    """Pools of random blocks ([blocks, page, *row]), each request's blocks a random choice of them, and the
    contiguous caches they make ([B, n_blocks * page, *row])."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = max(-(-n // page) for n in lens)
    made = [torch.randn(len(lens) * n_blocks + 3, page, *row, generator=g).to(DEV) for _ in range(pools)]
    table = torch.randperm(made[0].shape[0], generator=g)[:len(lens) * n_blocks].view(len(lens), n_blocks).to(DEV)
    contiguous = [p[table].flatten(1, 2) for p in made]
    return made, table.to(torch.int32), contiguous, torch.tensor(lens, dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("s,splits", [(1, 1), (1, 3), (2, 2)])
def test_block_table_path_equals_contiguous_path(s, splits):
    c, r, h, page = 32, 8, 4, 8
    (pool,), table, (contiguous,), lens = _paged_case([13, 5, 29], page, (c + r,), seed=s * 10 + splits)
    q = torch.randn(3, s, h, c + r, generator=torch.Generator().manual_seed(splits)).to(DEV)
    cfg = MLAConfig(16, 16, splits, 1, 1)
    want = mla_absorbed(q, contiguous, 0.2, c, cache_lens=lens, config=cfg)
    got = mla_absorbed(q, pool, 0.2, c, cache_lens=lens, config=cfg, block_table=table)
    assert ((got - want).norm() / want.norm()) < 1e-5
    default = mla_absorbed(q, pool, 0.2, c, cache_lens=lens, block_table=table.long())   # the default launch
    assert ((default - want).norm() / want.norm()) < 1e-5


def test_block_table_errors_are_named():
    (pool,), table, _, lens = _paged_case([9, 4], 8, (40,), seed=0)
    q = torch.randn(2, 1, 4, 40).to(DEV)
    with pytest.raises(InputError, match="lengths"):
        mla_absorbed(q, pool, 0.2, 32, block_table=table)
    with pytest.raises(InputError, match="outside the pool"):
        mla_absorbed(q, pool, 0.2, 32, cache_lens=lens, block_table=table + pool.shape[0])
    with pytest.raises(InputError, match="block_table must be"):
        mla_absorbed(q, pool, 0.2, 32, cache_lens=lens, block_table=table[:1])


@pytest.mark.parametrize("s", [1, 3])
def test_gqa_block_table_path_equals_contiguous_path(s):
    hq, hkv, d, page = 4, 2, 16, 4
    (k, v), table, (kc, vc), lens = _paged_case([7, 16, 2], page, (hkv, d), seed=s, pools=2)
    q = torch.randn(3, s, hq, d, generator=torch.Generator().manual_seed(s)).to(DEV)
    cfg = FlashConfig(16, 16, 1, 1)
    want = flash_attention(q, kc, vc, 0.25, config=cfg, kv_lens=lens)
    got = flash_attention(q, k, v, 0.25, config=cfg, kv_lens=lens, block_table=table)
    assert ((got - want).norm() / want.norm()) < 1e-5
    with pytest.raises(InputError, match="lengths"):
        flash_attention(q, k, v, 0.25, block_table=table)


def test_dsa_block_table_paths_equal_contiguous_paths():
    """V3.2: the indexer's scores over a paged key cache and sparse MLA over a paged latent cache (selected rows,
    -1 slots and rows past a length included) equal the contiguous kernels' on the valid keys."""
    c, r, h, d, page, s = 32, 8, 4, 16, 4, 2
    lens_list = [9, 3, 14]
    (kpool,), table, (kc,), lens = _paged_case(lens_list, page, (d,), seed=3)
    g = torch.Generator().manual_seed(4)
    lat = torch.randn(kpool.shape[0], page, c + r, generator=g).to(DEV)
    latc = lat[table.long()].flatten(1, 2)
    q = torch.randn(3, s, h, d, generator=g).to(DEV)
    w = torch.randn(3, s, h, generator=g).to(DEV)
    want = indexer_logits(q, kc, w, 0.3, kv_lens=lens)
    got = indexer_logits(q, kpool, w, 0.3, kv_lens=lens, block_table=table)
    valid = torch.isfinite(want)
    assert torch.equal(valid, torch.isfinite(got)) and valid.any(dim=-1).all()
    assert torch.allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    idx = torch.randint(-1, 14, (3, s, 5), generator=g).to(DEV)
    qs = torch.randn(3, s, h, c + r, generator=g).to(DEV)
    want = sparse_mla(qs, latc, idx, 0.2, c, kv_lens=lens)
    got = sparse_mla(qs, lat, idx, 0.2, c, kv_lens=lens, block_table=table)
    assert want.abs().sum() > 0 and ((got - want).norm() / want.norm()) < 1e-5
