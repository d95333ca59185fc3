"""A serving step's prefill chunks packed into one paged call (dsgraph/serve/packing.py): the rows' layout, the
host-side range checks of a paged call's inputs, and on triton one program call per step whatever its number of
chunks, writing the cache rows a plain prefill computes."""
from __future__ import annotations

import hf_fixtures as fx
import pytest
import torch

import dsgraph
from dsgraph.errors import InputError
from dsgraph.serve import packing
from dsgraph.serve.engine import Engine
from dsgraph.serve.paged import BlockPool

_one_thread = pytest.fixture(scope="module", autouse=True)(fx.one_thread)
DEV = "cuda" if torch.cuda.is_available() else "cpu"    # the interpreter on the CPU (tests/conftest.py)


def test_chunks_pack_into_rows_ending_at_each_chunk_last_token(monkeypatch):
    monkeypatch.setattr(packing, "ROW_LENGTHS", (4,))
    page, pad = 2, 99     # a chunk of 6 after 3 cached tokens (blocks 7, 3, 5, 8, 1), one of 2 from the start
    p = packing.pack([packing.Chunk([11, 12, 13, 14, 15, 16], 3, [7, 3, 5, 8, 1]), packing.Chunk([21, 22], 0, [4])],
                     page, pad)
    assert p.ids.tolist() == [[0, 0, 11, 12], [13, 14, 15, 16], [0, 0, 21, 22]]      # padding at the front
    assert p.positions.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 1]]       # padding at a valid position
    assert p.slots.tolist() == [[pad, pad, 7, 10], [11, 16, 17, 2], [pad, pad, 8, 9]]   # block * page + offset
    assert p.lens.tolist() == [5, 9, 2] and p.last == [1, 2]
    assert p.table.tolist() == [[7, 3, 5, 8, 1, 0, 0, 0]] * 2 + [[4, 0, 0, 0, 0, 0, 0, 0]]   # width a power of 2


def test_paged_inputs_out_of_range_are_named():
    pool = BlockPool(dsgraph.load("deepseek-v2-lite-tiny").graph, num_blocks=4, block_size=2, device="cpu")
    table, slots, lens, pos = torch.tensor([[0, 3]]), torch.tensor([[7]]), torch.tensor([4]), torch.tensor([[3]])
    pool.check_rows(table, slots, lens, pos)
    pool.check_rows(table, torch.tensor([[pool.pad_slot]]), lens, pos)            # the scratch slot is fine
    for bad, match in (((table + 1, slots, lens, pos), "block ids"), ((table, slots + 2, lens, pos), "write slots"),
                       ((table, slots, lens + 1, pos), "cache lengths"), ((table, slots, lens, -pos), "positions")):
        with pytest.raises(InputError, match=match):
            pool.check_rows(*bad)


def test_one_paged_call_for_every_prefill_chunk_of_a_step(monkeypatch):
    """Three prompts prefilled in one step: one call of the paged program ([4 rows, 8]: the 11-token prompt takes
    two rows), none per chunk, and each request's cache rows in its blocks and first token equal a plain prefill's
    (on a GPU where there is one: the packed call is never captured)."""
    monkeypatch.setattr(packing, "ROW_LENGTHS", (8,))
    exe = dsgraph.compile(dsgraph.load("deepseek-v2-lite-tiny"), backend="triton", device=DEV, dtype=torch.float32)
    eng = Engine(exe, max_num_seqs=3, max_num_batched_tokens=32, block_size=4)
    shapes, program = [], eng.paged.program
    monkeypatch.setattr(eng.paged, "program", lambda inputs: shapes.append(tuple(inputs["input_ids"].shape))
                        or program(inputs))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, exe.vocab_size, (n,), generator=g).tolist() for n in (11, 3, 6)]
    rids = [eng.add_request(p, 2) for p in prompts]
    outs = eng.step()
    assert shapes == [(4, 8)] and eng.calls == {"paged_decode": 0, "paged_prefill": 1, "contiguous": 0}
    for rid, prompt, out in zip(rids, prompts, outs):
        seq = next(s for s in eng.running if s.rid == rid)
        logits, state = exe.prefill([prompt])       # the program over contiguous caches
        assert out.new_token_ids == [int(logits[0, -1].argmax())]
        got = eng.pool.gather([seq.table], len(prompt))
        for name, want in state.caches.items():
            assert (got[name] - want).norm() / want.norm() < 1e-4, name
