"""In-place KV-cache appends keep cache.append's functional contract: every result equals torch.cat, and a view
once handed out never changes, whichever state later appends."""
import torch
from dsgraph.backends import kv_cache


def rows(b, s, gen, width=(3, 5)):
    return torch.randn(b, s, *width, generator=gen)


def test_appends_write_in_place_and_equal_cat():
    gen = torch.Generator().manual_seed(0)
    cache, want = torch.zeros(2, 0, 3, 5), torch.zeros(2, 0, 3, 5)
    ptrs = set()
    for step in range(40):
        new = rows(2, 7 if step == 0 else 1, gen)
        cache, want = kv_cache.append(cache, new), torch.cat((want, new), dim=1)
        assert torch.equal(cache, want)
        ptrs.add(cache.data_ptr())
    assert len(ptrs) == 1                                   # 46 rows fit the first buffer: never copied
    assert kv_cache.capacity(cache) >= cache.shape[1] + 1 and kv_cache.capacity(want) == want.shape[1]


def test_full_buffer_grows_and_keeps_the_rows():
    gen = torch.Generator().manual_seed(1)
    cache = kv_cache.append(torch.zeros(1, 0, 3, 5), rows(1, 10, gen))
    cap = kv_cache.capacity(cache)
    big = rows(1, cap, gen)
    grown = kv_cache.append(cache, big)
    assert kv_cache.capacity(grown) > cap and torch.equal(grown, torch.cat((cache, big), dim=1))


def test_older_views_never_change_and_branches_copy():
    gen = torch.Generator().manual_seed(2)
    a = kv_cache.append(torch.zeros(2, 0, 3, 5), rows(2, 4, gen))
    a_copy = a.clone()
    b = kv_cache.append(a, rows(2, 2, gen))                 # newest: in place
    b_copy = b.clone()
    c = kv_cache.append(a, rows(2, 3, gen))                 # branch from the older state: must not touch b
    assert torch.equal(a, a_copy) and torch.equal(b, b_copy)
    assert c.data_ptr() != b.data_ptr() and torch.equal(c[:, :4], a_copy)
    d = kv_cache.append(b[:, :5], rows(2, 1, gen))          # a slice of a view is not the newest: copies
    assert torch.equal(b, b_copy) and torch.equal(d[:, :5], b_copy[:, :5])


def test_rewind_releases_the_tail_for_an_owner_that_drops_it():
    gen = torch.Generator().manual_seed(3)
    long = kv_cache.append(kv_cache.append(torch.zeros(1, 0, 3, 5), rows(1, 6, gen)), rows(1, 3, gen))
    cut = long[:, :7]
    assert kv_cache.append(cut, rows(1, 1, gen)).data_ptr() != long.data_ptr()   # not rewound: copies
    again = kv_cache.append(kv_cache.rewind(cut), rows(1, 1, gen))
    assert again.data_ptr() == long.data_ptr() and torch.equal(again[:, :7], cut)  # in place past the cut


def test_reserve_gives_room_for_the_next_steps():
    gen = torch.Generator().manual_seed(5)
    plain = rows(2, 9, gen)
    cache = kv_cache.reserve(plain, 4)
    assert torch.equal(cache, plain) and kv_cache.capacity(cache) == 13
    step = kv_cache.append(cache, rows(2, 1, gen))
    assert step.data_ptr() == cache.data_ptr()
    assert kv_cache.append(kv_cache.rewind(cache), rows(2, 1, gen)).data_ptr() == cache.data_ptr()


def test_triton_decode_writes_the_caches_in_place_and_matches_eager():
    """The triton backend writes the latent row into `extend`'s spare rows (cache.append fused with the row
    kernel; `append` where it stands alone): decode steps keep every cache in its buffer (its
    caches are absorbed MLA's latent ones, eager's the naive per-head ones: the logits are what compare)."""
    import dsgraph
    model = dsgraph.load("deepseek-v2-lite-tiny")
    exe, ref = dsgraph.compile(model, backend="triton"), dsgraph.compile(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    (logits, state), (ref_logits, ref_state) = exe.prefill(ids), ref.prefill(ids)
    ptrs = {n: t.data_ptr() for n, t in state.caches.items()}
    for _ in range(3):
        tok = ref_logits[:, -1:].argmax(-1)
        (logits, state), (ref_logits, ref_state) = exe.decode(tok, state), ref.decode(tok, ref_state)
        assert ((logits - ref_logits).norm() / ref_logits.norm()).item() <= 1e-4
    assert {n: t.data_ptr() for n, t in state.caches.items()} == ptrs
    assert "written into the cache: kv_cache.extend" in exe.report()
