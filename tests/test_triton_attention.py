"""Triton attention templates against the ops' torch references: absorbed MLA decode (split-KV, ragged cache
lengths, MTP-style S > 1) and flash prefill (GQA groups, D != Dv, head dims that are not powers of two).

On the CPU these run through Triton's interpreter (tests/conftest.py switches it on), which is slow and
computes bf16 dots wrongly: shapes are tiny and dtypes fp32/fp16 here; bf16 at real shapes is `-m gpu`.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first triton import, also when run without conftest
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsgraph.backends.triton.kernels import mla_decode  # noqa: E402
from dsgraph.backends.triton.kernels.flash_attention import FlashConfig, flash_attention, pow2_split  # noqa: E402
from dsgraph.backends.triton.kernels.mla_decode import MLAConfig, mla_absorbed  # noqa: E402
from dsgraph.backends.triton.kernels.mla_decode_gluon import GLUON_CONFIG, fits  # noqa: E402

from dsgraph.errors import InputError, ShapeError  # noqa: E402
from dsgraph.ops.attention import attention_ref, mla_absorbed_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
SMALL = MLAConfig(block_h=16, block_n=16, num_splits=1, num_warps=4, num_stages=1)
ROOT = Path(__file__).resolve().parents[1]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=DEV, dtype=dtype)


def mla_ref_lens(q, cache, scale, c, lens, causal=True):
    """Reference with per-request lengths: each request attends to its own cache prefix."""
    if lens is None:
        return mla_absorbed_ref(q, cache, scale, causal, c)
    return torch.cat([mla_absorbed_ref(q[i:i + 1], cache[i:i + 1, :int(n)], scale, causal, c)
                      for i, n in enumerate(lens.tolist())])


def cfg(splits):
    return MLAConfig(SMALL.block_h, SMALL.block_n, splits, SMALL.num_warps, SMALL.num_stages)


# ------------------------------------------------------------------------------------------------ MLA decode

MLA_CASES = [  # B, S, H, T, C, R, splits, lens
    (1, 1, 4, 1, 32, 8, 1, None),
    (2, 1, 4, 7, 32, 8, 2, None),
    (1, 2, 3, 33, 32, 8, 3, None),
    (2, 5, 4, 100, 32, 8, 4, None),  # 20 rows: two row blocks, the second ragged
    (1, 1, 20, 33, 24, 8, 2, None),  # C not a power of two: padded value block
    (3, 2, 4, 100, 32, 8, 3, [100, 37, 5]),  # ragged lengths, one shorter than a split's chunk
    (2, 1, 4, 33, 32, 8, 1, [1, 33]),
    (2, 1, 4, 50, 160, 16, 3, [50, 20]),  # C wider than a reduce slice (128): two slices, the second ragged
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,s,h,t,c,r,splits,lens", MLA_CASES)
def test_mla_absorbed_matches_reference(b, s, h, t, c, r, splits, lens, dtype):
    gen = torch.Generator().manual_seed(hash((b, s, h, t, c, splits)) % 2**31)
    q, cache = rand(b, s, h, c + r, dtype=dtype, gen=gen), rand(b, t, c + r, dtype=dtype, gen=gen)
    lens_t = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = (c + r) ** -0.5
    out = mla_absorbed(q, cache, scale, c, cache_lens=lens_t, config=cfg(splits))
    assert out.shape == (b, s, h, c) and out.dtype == dtype
    assert rel_err(out, mla_ref_lens(q, cache, scale, c, lens_t)) < TOL[dtype]


def test_mla_default_launch_non_causal_and_strided_inputs():
    """Default launch (first candidate, heuristic splits), a cache that is a prefix of a bigger preallocated buffer,
    a q sliced out of a wider tensor, int64 lengths, causal=False."""
    gen = torch.Generator().manual_seed(1)
    b, s, h, t, c, r = 2, 3, 4, 50, 32, 8
    buf = rand(b, 64, c + r, dtype=torch.float32, gen=gen)
    cache = buf[:, :t]
    q = rand(b, s, h, c + r + 5, dtype=torch.float32, gen=gen)[..., 2:2 + c + r]
    lens = torch.tensor([50, 21], dtype=torch.int64, device=DEV)
    for causal in (True, False):
        out = mla_absorbed(q, cache, 0.3, c, cache_lens=lens, causal=causal)
        assert rel_err(out, mla_ref_lens(q, cache, 0.3, c, lens, causal)) < 1e-5
    out = mla_absorbed(q, cache, 0.3, c, config=cfg(5))  # more splits than some partitions have tiles
    assert rel_err(out, mla_absorbed_ref(q, cache, 0.3, True, c)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mla_query_in_two_parts_matches_the_concatenated_query(dtype):
    """q_rope passed apart (as the triton backend does instead of launching the concat), each part a strided view
    of its own wider tensor; ragged lengths and two splits."""
    gen = torch.Generator().manual_seed(3)
    b, s, h, t, c, r = 2, 2, 4, 45, 32, 8
    q_lat = rand(b, s, h, c + 3, dtype=dtype, gen=gen)[..., 1:1 + c]
    q_pe = rand(b, s, h, 2 * r, dtype=dtype, gen=gen)[..., ::2]
    cache = rand(b, t, c + r, dtype=dtype, gen=gen)
    lens = torch.tensor([45, 17], dtype=torch.int32, device=DEV)
    whole = torch.cat([q_lat, q_pe], dim=-1)
    out = mla_absorbed(q_lat, cache, 0.3, c, cache_lens=lens, config=cfg(2), q_rope=q_pe)
    assert torch.equal(out, mla_absorbed(whole, cache, 0.3, c, cache_lens=lens, config=cfg(2)))
    assert rel_err(out, mla_ref_lens(whole, cache, 0.3, c, lens)) < TOL[dtype]


def test_mla_rows_without_visible_keys_are_zero():
    """L_b < S: query 0 of a request with one cached row sees nothing (the reference would give NaN)."""
    gen = torch.Generator().manual_seed(2)
    q, cache = rand(1, 2, 4, 40, dtype=torch.float32, gen=gen), rand(1, 9, 40, dtype=torch.float32, gen=gen)
    out = mla_absorbed(q, cache, 0.2, 32, cache_lens=torch.tensor([1], device=DEV), config=cfg(2))
    assert torch.all(out[:, 0] == 0)
    assert rel_err(out[:, 1:], mla_absorbed_ref(q[:, 1:], cache[:, :1], 0.2, True, 32)) < 1e-5


def test_mla_bad_inputs_raise():
    q, cache = torch.randn(2, 1, 4, 40, device=DEV), torch.randn(2, 9, 40, device=DEV)
    with pytest.raises(ShapeError, match="cache"):
        mla_absorbed(q, cache[:1], 0.1, 32)
    with pytest.raises(ShapeError, match="kv_lora_rank"):
        mla_absorbed(q, cache, 0.1, 40)
    with pytest.raises(InputError, match="cache_lens"):
        mla_absorbed(q, cache, 0.1, 32, cache_lens=torch.tensor([3.0, 4.0], device=DEV))
    with pytest.raises(InputError, match="cache_lens"):
        mla_absorbed(q, cache, 0.1, 32, cache_lens=torch.tensor([3], device=DEV))
    with pytest.raises(InputError, match="dtype"):
        mla_absorbed(q.half(), cache, 0.1, 32)
    with pytest.raises(ShapeError, match="q_rope"):  # the latent part must be exactly kv_lora_rank wide
        mla_absorbed(q[..., :30], cache, 0.1, 32, q_rope=q[..., 30:])
    with pytest.raises(ShapeError, match="q_rope"):
        mla_absorbed(q[..., :32], cache, 0.1, 32, q_rope=q[:, :, :2, 32:])


# ------------------------------------------------------------------------------------- MLA decode, Gluon (Hopper)

def _mla_parts(b, h, t, dtype=torch.bfloat16, device=DEV):
    """Shapes only (the CPU tests never launch the Gluon kernel): q's latent and rope views, and a cache."""
    q = torch.empty(b, 1, h, 576, dtype=dtype, device=device)
    return q[..., :512], q[..., 512:], torch.empty(b, t, 576, dtype=dtype, device=device)


def test_gluon_mla_scope_names_why_a_call_is_outside_it():
    qc, qr, cache = _mla_parts(2, 128, 100)
    assert fits(qc, qr, cache, None, False) is None
    lens = torch.tensor([5, 100], dtype=torch.int32)
    assert fits(qc, qr, cache, lens, True) is None
    assert "finite_tail" in fits(qc, qr, cache, lens, False)
    assert "heads a multiple of 64" in fits(*_mla_parts(2, 16, 100), None, False)
    q2 = torch.empty(2, 2, 128, 576, dtype=torch.bfloat16)
    assert "one query row" in fits(q2[..., :512], q2[..., 512:], cache, None, False)
    assert "bf16 or fp16" in fits(*_mla_parts(2, 128, 100, torch.float32), None, False)
    gapped = torch.empty(4, 1, 128, 576, dtype=torch.bfloat16)[::2]  # any batch stride TMA can step is fine
    assert fits(gapped[..., :512], gapped[..., 512:], cache, None, False) is None
    shifted = torch.empty(2, 1, 128, 577, dtype=torch.bfloat16)[..., 1:]  # base 2 bytes off a 16-byte boundary
    assert "TMA" in fits(shifted[..., :512], shifted[..., 512:], cache, None, False)
    odd = torch.empty(2, 100, 577, dtype=torch.bfloat16)[..., :576]  # 1154-byte rows: not 16-byte multiples
    assert "TMA" in fits(qc, qr, odd, None, False)


def test_gluon_mla_config_leads_where_one_split_would(monkeypatch):
    """Batches that fill the GPU get the Gluon kernel by default in a CUDA-graph capture; plain launches (its host
    cost) and batch 1 (split-KV) keep the Triton tiles first and offer the Gluon kernel to the tuner last; it is
    never offered where the call does not fit."""
    monkeypatch.setattr(mla_decode, "interpreting", lambda: False)
    full = mla_decode.mla_candidates(64, 128, 4096, 132, gluon=True, graphed=True)
    assert full[0] == GLUON_CONFIG and GLUON_CONFIG not in full[1:]
    plain = mla_decode.mla_candidates(64, 128, 4096, 132, gluon=True)
    assert plain[0].kernel == "triton" and plain[-1] == GLUON_CONFIG
    one = mla_decode.mla_candidates(1, 128, 4096, 132, gluon=True, graphed=True)
    assert one[0].kernel == "triton" and one[0].num_splits > 1 and one[-1] == GLUON_CONFIG
    assert all(c.kernel == "triton" for c in mla_decode.mla_candidates(64, 128, 4096, 132, graphed=True))


def test_gluon_mla_config_refused_where_it_cannot_run():
    q, cache = torch.randn(2, 1, 4, 40, device=DEV), torch.randn(2, 9, 40, device=DEV)
    why = "heads a multiple of 64" if mla_decode.hopper(DEV) else "sm_90"
    with pytest.raises(InputError, match=f"Gluon kernel cannot run this call.*{why}"):
        mla_absorbed(q, cache, 0.1, 32, config=GLUON_CONFIG)
    with pytest.raises(InputError, match="MLAConfig.kernel"):
        mla_absorbed(q, cache, 0.1, 32, config=dataclasses.replace(SMALL, kernel="cuda"))


def test_gluon_mla_compiles_for_hopper_with_one_score_tile_per_warpgroup(tmp_path):
    """Built for sm_90 on any machine (a subprocess: this one runs Triton's interpreter): warp-specialised
    (setmaxnreg), each warpgroup's score product a whole 64 x 64 tile (m64n64k16, not the m64n32k16 halves of the
    Triton template), PV in 256-column halves, within the H100's 227 KB of shared memory; with and without
    device-side lengths."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from dsgraph.backends.triton.kernels.mla_decode_gluon import compile_for_hopper as c; "
            "print(json.dumps([c(True), c(False)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)  # the installed dsgraph, not a source folder in the working directory
    assert out.returncode == 0, out.stderr[-3000:]
    for report in json.loads(out.stdout.strip().splitlines()[-1]):
        assert report["wgmma"] == ["m64n256k16", "m64n64k16"] and report["setmaxnreg"] > 0
        assert report["shared_bytes"] <= 232448


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only guard")
def test_bf16_refused_on_interpreter():
    q = torch.randn(1, 1, 2, 40, dtype=torch.bfloat16)
    with pytest.raises(InputError, match="bfloat16"):
        mla_absorbed(q, torch.randn(1, 3, 40, dtype=torch.bfloat16), 0.1, 32)


# ------------------------------------------------------------------------------------------------ flash prefill

FLASH_CASES = [  # B, S, T, Hq, Hkv, D, Dv, causal
    (1, 1, 1, 2, 2, 16, 16, True),
    (2, 5, 7, 4, 2, 24, 16, True),  # GQA group 2, D = 16 + 8
    (1, 33, 33, 2, 1, 48, 32, True),  # MQA, D = 32 + 16 (the 192 = 128 + 64 pattern, scaled down)
    (1, 7, 100, 3, 3, 40, 24, True),  # chunk at the end of a long context, Dv padded
    (2, 2, 33, 4, 4, 12, 20, True),  # D below the 16-wide dot minimum
    (1, 5, 33, 2, 1, 24, 16, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,s,t,hq,hkv,d,dv,causal", FLASH_CASES)
def test_flash_attention_matches_reference(b, s, t, hq, hkv, d, dv, causal, dtype):
    gen = torch.Generator().manual_seed(hash((b, s, t, hq, d, causal)) % 2**31)
    q, k, v = (rand(b, s, hq, d, dtype=dtype, gen=gen), rand(b, t, hkv, d, dtype=dtype, gen=gen),
               rand(b, t, hkv, dv, dtype=dtype, gen=gen))
    out = flash_attention(q, k, v, d ** -0.5, causal=causal, config=FlashConfig(16, 16, 4, 1))
    assert out.shape == (b, s, hq, dv) and out.dtype == dtype
    assert rel_err(out, attention_ref(q, k, v, d ** -0.5, causal)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("s,lens", [(1, [1, 19, 33, 7]), (3, [5, 3, 40, 17])])
def test_flash_attention_with_device_lengths_reads_only_the_valid_keys(s, lens, dtype):
    """kv_lens: each request sees its first L_b keys with its queries at their end; the rows past L_b hold
    garbage (NaN) that must not leak. The reference runs each request on its own valid slice."""
    gen = torch.Generator().manual_seed(11 + s)
    b, t, hq, hkv, d, dv = len(lens), 40, 4, 2, 24, 16
    q, k, v = (rand(b, s, hq, d, dtype=dtype, gen=gen), rand(b, t, hkv, d, dtype=dtype, gen=gen),
               rand(b, t, hkv, dv, dtype=dtype, gen=gen))
    for i, n in enumerate(lens):
        k[i, n:], v[i, n:] = float("nan"), float("nan")
    out = flash_attention(q, k, v, d ** -0.5, config=FlashConfig(16, 16, 4, 1),
                          kv_lens=torch.tensor(lens, device=DEV))
    for i, n in enumerate(lens):
        ref = attention_ref(q[i:i + 1], k[i:i + 1, :n], v[i:i + 1, :n], d ** -0.5, True)
        assert rel_err(out[i:i + 1], ref) < TOL[dtype]
    with pytest.raises(InputError, match="kv_lens"):
        flash_attention(q, k, v, 0.1, kv_lens=torch.tensor(lens[:2], device=DEV))


def test_flash_autotuned_path_strided():
    gen = torch.Generator().manual_seed(3)
    qkv = rand(2, 20, 3, 4, 24, dtype=torch.float32, gen=gen)  # packed, so every operand is strided
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2, :, :16]
    out = flash_attention(q, k, v, 0.25)
    assert rel_err(out, attention_ref(q, k, v, 0.25, True)) < 1e-5


def test_flash_bad_inputs_raise():
    q, k, v = (torch.randn(1, 4, 3, 16, device=DEV), torch.randn(1, 4, 2, 16, device=DEV),
               torch.randn(1, 4, 2, 16, device=DEV))
    with pytest.raises(ShapeError, match="multiple"):
        flash_attention(q, k, v, 0.1)
    with pytest.raises(ShapeError, match="head dim"):
        flash_attention(q[:, :, :2, :8], k, v, 0.1)


def test_pow2_split():
    assert pow2_split(192) == (128, 64, 128, 64)
    assert pow2_split(576) == (512, 64, 512, 64)
    assert pow2_split(128) == (128, 0, 128, 16)
    assert pow2_split(12) == (8, 4, 16, 16)


# ---------------------------------------------------------------------------------------------- GPU, bf16, real shapes

@gpu
@needs_cuda
@pytest.mark.parametrize("b,s,h,t,splits", [(4, 1, 16, 1000, None), (2, 4, 128, 777, None), (1, 1, 128, 4096, 16)])
def test_mla_absorbed_bf16_gpu(b, s, h, t, splits):
    gen = torch.Generator().manual_seed(4)
    q, cache = rand(b, s, h, 576, dtype=torch.bfloat16, gen=gen), rand(b, t, 576, dtype=torch.bfloat16, gen=gen)
    lens = torch.randint(s, t + 1, (b,), generator=gen).to(device=DEV, dtype=torch.int32)
    out = mla_absorbed(q, cache, 576 ** -0.5, 512, cache_lens=lens, num_splits=splits, tune=splits is None)
    assert rel_err(out, mla_ref_lens(q, cache, 576 ** -0.5, 512, lens)) < TOL[torch.bfloat16]


needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                  reason="needs an sm_90 GPU")


@gpu
@needs_hopper
@pytest.mark.parametrize("b,h,t,lens,split_q,dtype", [
    (3, 128, 300, [300, 1, 129], False, torch.bfloat16),  # T and two lengths not multiples of the 64-key tile
    (2, 64, 1000, None, True, torch.float16),             # q in two parts, head-major; all rows valid
    (64, 128, 4096, "ragged", False, torch.bfloat16),     # the benchmark shape
    (2, 128, 70, [0, 70], True, torch.bfloat16),          # a request with no cached row gives zeros
])
def test_mla_gluon_matches_reference_gpu(b, h, t, lens, split_q, dtype):
    """The Gluon kernel against the fp32-accumulating torch reference. The cache is the prefix of a buffer whose
    spare rows hold NaN, so a tile read past T must come in as TMA's zeros; with lengths, rows in [L_b, T) hold
    finite values (finite_tail), which the kernel reads and masks."""
    gen = torch.Generator().manual_seed(b * h + t)
    buf = torch.full((b, t + 64, 576), float("nan"), dtype=dtype, device=DEV)
    buf[:, :t] = rand(b, t, 576, dtype=dtype, gen=gen)
    cache = buf[:, :t]
    if lens == "ragged":
        lens = torch.randint(1, t + 1, (b,), generator=gen).tolist()
    lens_t = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=DEV)
    if split_q:  # head-major latent part (as a batched einsum leaves it), rope part strided in a wider tensor
        parts = dict(q=rand(h, b, 512, dtype=dtype, gen=gen).permute(1, 0, 2)[:, None],
                     q_rope=rand(b, 1, h, 80, dtype=dtype, gen=gen)[..., 8:72])
        q = torch.cat([parts["q"], parts["q_rope"]], dim=-1)
    else:
        q = rand(b, 1, h, 576, dtype=dtype, gen=gen)
        parts = dict(q=q)
    out = mla_absorbed(**parts, cache=cache, scale=576 ** -0.5, kv_lora_rank=512, cache_lens=lens_t,
                       config=GLUON_CONFIG, finite_tail=True)
    assert out.shape == (b, 1, h, 512) and out.dtype == dtype
    if lens is not None and 0 in lens:
        assert torch.all(out[lens.index(0)] == 0)
        keep = [i for i, n in enumerate(lens) if n > 0]
        out, q, cache, lens_t = out[keep], q[keep], cache[keep], lens_t[keep]
    assert rel_err(out, mla_ref_lens(q, cache, 576 ** -0.5, 512, lens_t)) < TOL[dtype]


@gpu
@needs_hopper
def test_mla_tail_that_may_be_nan_keeps_the_template_gpu():
    """Without finite_tail, lengths and NaN past them: the Gluon kernel is not a candidate and the output is right."""
    gen = torch.Generator().manual_seed(6)
    q, cache = rand(64, 1, 128, 576, dtype=torch.bfloat16, gen=gen), rand(64, 256, 576, dtype=torch.bfloat16, gen=gen)
    lens = torch.randint(1, 200, (64,), generator=gen).to(device=DEV, dtype=torch.int32)
    cache[:, 200:] = float("nan")
    assert "finite_tail" in mla_decode.gluon_unfit(q[..., :512], q[..., 512:], cache, lens, False)
    out = mla_absorbed(q, cache, 576 ** -0.5, 512, cache_lens=lens, tune=True)
    assert rel_err(out, mla_ref_lens(q, cache, 576 ** -0.5, 512, lens)) < TOL[torch.bfloat16]


@gpu
@needs_cuda
@pytest.mark.parametrize("b,s,t,hq,hkv,d,dv", [(2, 300, 300, 16, 16, 192, 128), (1, 257, 1000, 32, 8, 128, 128)])
def test_flash_attention_bf16_gpu(b, s, t, hq, hkv, d, dv):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (rand(b, s, hq, d, dtype=torch.bfloat16, gen=gen), rand(b, t, hkv, d, dtype=torch.bfloat16, gen=gen),
               rand(b, t, hkv, dv, dtype=torch.bfloat16, gen=gen))
    out = flash_attention(q, k, v, d ** -0.5)
    assert rel_err(out, attention_ref(q, k, v, d ** -0.5, True)) < TOL[torch.bfloat16]
