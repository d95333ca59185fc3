"""DeepSeek-V4's attention kernels (backends/triton/kernels/v4_attention.py, the slot-masked top-k) against their
ops' torch references on fresh random inputs: window 4, ratio 4 (CSA) / 8 (HCA), attention for two requests at
different positions over compact entries (one past every query's horizon), compression of steps that start
inside a group, sequences past the window and several groups, top-k below the entry count; fp32 on the
interpreter, bf16 on a GPU. And the tiny V4 preset's triton report naming them instead of fallbacks."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from dsgraph.backends.triton.kernels.topk import topk
from dsgraph.backends.triton.kernels.v4_attention import compress, sink_attention

import dsgraph
from dsgraph.numerics import rel_err, tolerance
from dsgraph.ops import get_op

G = torch.Generator().manual_seed(11)
WINDOW = 4
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels on the GPU where there is one, else interpreted
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def R(*shape, dtype=torch.float32, dev=DEV):
    return torch.randn(*shape, generator=G).to(dev, dtype)


def _positions(s: int, starts=(0, 9), dev=DEV):
    return (torch.tensor(starts)[:, None] + torch.arange(s)).to(dev)


def _sink_case(s, ratio, kind, dtype, dev, h=3, d=32, k=3, t=None):
    """Inputs of attention.sink: kv = concat(state, new), compact entries up to one past the last position's, distinct
    indices drawn from every entry (visible to the query or not) with some -1."""
    pos = _positions(s, dev=dev)
    t = t or (int(pos.max()) + 1) // max(ratio, 1) + 1
    args = [R(2, s, h, d, dtype=dtype, dev=dev), R(2, WINDOW - 1 + s, d, dtype=dtype, dev=dev), R(h, dev=dev), pos]
    if kind != "sliding":
        args.append(R(2, t, d, dtype=dtype, dev=dev))
    if kind == "csa":
        idx = torch.stack([torch.randperm(t, generator=G)[:k] for _ in range(2 * s)]).reshape(2, s, k)
        idx[0, 0, -1] = -1
        args.append(idx.to(dev))
    return args, {"window": WINDOW, "ratio": ratio if kind != "sliding" else 0, "scale": d ** -0.5}


def _check_sink(args, attrs, dtype, splits=None):
    comp, idx = (args[4:] + [None, None])[:2]
    got = sink_attention(*args[:4], attrs["window"], attrs["scale"], comp=comp, indices=idx, ratio=attrs["ratio"],
                         num_splits=splits)
    want = get_op("attention.sink").reference_fn(*args, **attrs)
    assert got.dtype == dtype
    assert rel_err(got.float(), want) < tolerance(str(dtype).removeprefix("torch."), "op")


@pytest.mark.parametrize("kind,ratio", [("sliding", 0), ("hca", 8), ("csa", 4)])
def test_sink_attention_prefill(kind, ratio):
    args, attrs = _sink_case(11, ratio, kind, torch.float32, DEV)
    _check_sink(args, attrs, torch.float32)


def test_sink_attention_decode_split_kv():
    """One query at positions 12 and 21, its window and top-k over three split-KV partitions plus the sink."""
    args, attrs = _sink_case(1, 4, "csa", torch.float32, DEV, k=5, t=6)
    args[3] = args[3] + 12
    _check_sink(args, attrs, torch.float32, splits=3)


@pytest.mark.parametrize("ratio,overlap,s,t", [(8, False, 11, 13), (4, True, 11, 0), (4, True, 1, 7)])
def test_compress(ratio, overlap, s, t, dtype=torch.float32, dev=DEV):
    """A step of s tokens after t: (13 + 11) // 8 - 13 // 8 = 2 groups completed, 11 // 4 = 2, one at t = 7."""
    c = 24 if overlap else 16
    r = (2 if overlap else 1) * ratio - 1
    pos = _positions(s, starts=(t, t), dev=dev)
    args = (R(2, s, c, dtype=dtype, dev=dev), R(2, s, c, dtype=dtype, dev=dev), R(2, r, 2 * c, dtype=dtype, dev=dev),
            R(ratio, c, dev=dev), pos)
    got, starts = compress(*args, past=t, ratio=ratio, overlap=overlap)
    want, want_starts = get_op("v4.compress").reference_fn(*args, torch.zeros(2, t, 0, device=dev), ratio=ratio,
                                                          overlap=overlap)
    assert got.dtype == dtype and got.shape[1] == (1 if s == 1 else 2) and torch.equal(starts, want_starts)
    assert rel_err(got.float(), want.float()) < tolerance(str(dtype).removeprefix("torch."), "op")


def test_compress_candidate_ignores_the_buffer_length(dev=DEV):
    """A static step's one candidate (past: the buffer's 1023 rows, not the 7 tokens): at the token that completes
    a group it is the reference's entry and start."""
    c, ratio = 24, 4
    pos = _positions(1, starts=(7, 7), dev=dev)
    args = (R(2, 1, c, dev=dev), R(2, 1, c, dev=dev), R(2, 2 * ratio - 1, 2 * c, dev=dev), R(ratio, c, dev=dev), pos)
    got, starts = compress(*args, past=1023, ratio=ratio, overlap=True, candidate=True)
    want, want_starts = get_op("v4.compress").reference_fn(*args, torch.zeros(2, 7, 0, device=dev), ratio=ratio,
                                                          overlap=True)
    assert got.shape == want.shape == (2, 1, c // 2) and torch.equal(starts, want_starts)
    assert rel_err(got, want) < 1e-5


def test_topk_applies_the_slot_mask(dev=DEV):
    """Queries at 17..19 see 4-5 of 9 entries (fewer than k), at 30..32 7-8 (one row with only 5 finite)."""
    logits, pos = R(2, 3, 9, dev=dev), _positions(3, starts=(17, 30), dev=dev)
    logits[1, 2, 5:] = float("-inf")
    want = get_op("indexer.topk").reference_fn(get_op("indexer.slot_mask").reference_fn(logits, pos, ratio=4), k=6)
    assert (want[0] == -1).any() and torch.equal(topk(logits, 6, slot_ratio=4, positions=pos), want)


@pytest.mark.gpu
@gpu
def test_v4_attention_kernels_bf16_cuda():
    for kind, ratio in (("hca", 8), ("csa", 4)):
        args, attrs = _sink_case(11, ratio, kind, torch.bfloat16, "cuda")
        _check_sink(args, attrs, torch.bfloat16)
        _check_sink(args, attrs, torch.bfloat16, splits=2)
    test_compress(4, True, 11, 13, dtype=torch.bfloat16, dev="cuda")
    test_topk_applies_the_slot_mask(dev="cuda")


def test_sink_attention_fits_hopper_shared_memory(tmp_path):
    """The largest launch at V4-Flash's width (512-wide rows, 64 heads a program, top-k entries, split-KV) compiled
    for sm_90 here (a subprocess: this one may run the interpreter), within an H200's 227 KB of shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from dsgraph.backends.triton.kernels.v4_attention import sink_attention_shared_bytes as f; print(f())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)  # the installed dsgraph, not a source folder in the working directory
    assert out.returncode == 0, out.stderr[-3000:]
    assert 0 < int(out.stdout) <= 232448, out.stdout


def test_tiny_v4_report_names_the_kernels():
    report = dsgraph.compile(dsgraph.load("deepseek-v4-tiny"), backend="triton", device=DEV).compiled.report
    fallen = {k.op for k in report.fallbacks}
    assert not fallen & {"attention.sink", "v4.compress", "indexer.slot_mask", "indexer.topk"}, fallen
    for kernel in ("_sink_attention_kernel (window rows + the top-k", "_sink_attention_kernel (window rows + every",
                   "_sink_attention_kernel (window rows,", "_compress_kernel", "slot_mask applied as it reads"):
        assert kernel in str(report), kernel
