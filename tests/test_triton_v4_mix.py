"""DeepSeek-V4's mHC, routing and FFN kernels on triton against their ops' torch references: hc.pre (Sinkhorn's
comb doubly stochastic, N = 4 and a padded N = 3), hc.post, hc.head, sqrtsoftplus and hash routing over logits
reaching both softplus branches, the generated unweighted RMSNorm and clamped SwiGLU, integer neg / sub kept
exact. fp32 in the interpreter; the bf16 variants need a GPU."""
from __future__ import annotations

import pytest
import torch
from dsgraph.backends import get_backend

from dsgraph import GraphBuilder
from dsgraph.numerics import rel_err
from dsgraph.ops import get_op

pytest.importorskip("triton")
from dsgraph.backends.triton.codegen import rowwise  # noqa: E402
from dsgraph.backends.triton.codegen.source import load_kernel  # noqa: E402
from dsgraph.backends.triton.kernels import routing  # noqa: E402
from dsgraph.backends.triton.kernels import v4_mix as mix  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"  # the kernels on the GPU where there is one, else interpreted
needs_cuda = pytest.mark.skipif(not CUDA, reason="bf16 kernels run on CUDA (the interpreter is tested in fp32)")


def ref(op, *args, **attrs):
    return get_op(op).reference_fn(*args, **attrs)


def _hc_inputs(n, d, rows, seed, dev=DEV, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, n, d, generator=g)   # 21 tokens: a full 16-token mix program and a masked one
    fn = torch.randn(rows, n * d, generator=g) / (n * d) ** 0.5
    base, scale = torch.randn(rows, generator=g), torch.rand(3 if rows > n else 1, generator=g) + 0.5
    return x.to(dev, dtype), fn.to(dev), base.to(dev), scale.to(dev)


def _check_hc_pre(n, d, dev, dtype, tol):
    args = _hc_inputs(n, d, (2 + n) * n, seed=n * d, dev=dev, dtype=dtype)
    out, post, comb = mix.hc_mix(*args, iters=20, eps=1e-6, norm_eps=1e-6)
    want = ref("hc.pre", *args, iters=20, eps=1e-6, norm_eps=1e-6)
    assert out.dtype == dtype and post.dtype == comb.dtype == torch.float32
    for got, w in zip((out, post, comb), want):
        assert rel_err(got.float(), w.float()) < tol
    assert comb.std() > 0.05   # far from uniform: the test would see a wrong softmax or normalisation
    assert torch.allclose(comb.sum(-2), torch.ones_like(comb.sum(-2)), atol=1e-4)   # the last step's columns
    assert torch.allclose(comb.sum(-1), torch.ones_like(comb.sum(-1)), atol=1e-3)   # rows, after 20 rounds
    # 20 rounds have converged; 2 have not, so this sees a miscounted loop (2 vs 3 rounds: 4e-2 apart)
    few = mix.hc_mix(*args, iters=2, eps=1e-6, norm_eps=1e-6)[2]
    assert rel_err(few, ref("hc.pre", *args, iters=2, eps=1e-6, norm_eps=1e-6)[2]) < tol


# hc_mult 4 with N*D over two 128-wide projection chunks; a padded 3 x 3 tile with masked lanes
@pytest.mark.parametrize("n,d", [(4, 40), (3, 20)])
def test_hc_pre_sinkhorn_matches_reference(n, d):
    _check_hc_pre(n, d, DEV, torch.float32, 1e-5)


def test_hc_post_and_head_match_reference():
    n, d = 4, 300   # hc.post over 21 tokens: 2 x 5 programs of 16 tokens x 256 (n, d) outputs, the last ones masked
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 7, n, d, generator=g).to(DEV), torch.randn(3, 7, d, generator=g).to(DEV)
    post, comb = (torch.rand(3, 7, n, generator=g) * 2).to(DEV), torch.rand(3, 7, n, n, generator=g).to(DEV)
    assert rel_err(mix.hc_post(x, y, post, comb), ref("hc.post", x, y, post, comb)) < 1e-5
    args = _hc_inputs(n, d, n, seed=2)
    assert rel_err(mix.hc_mix(*args, eps=1e-6, norm_eps=1e-6, full=False),
                   ref("hc.head", *args, eps=1e-6, norm_eps=1e-6)) < 1e-5


def _logits(n, e, seed, dev=DEV, dtype=torch.float32):
    """Spread over [-30, 30]: scores in softplus' linear (> 20), log1p and exp (< -15) branches alike."""
    return (torch.randn(n, e, generator=torch.Generator().manual_seed(seed)) * 12).to(dev, dtype)


def _check_routes(dev, dtype):
    logits = _logits(7, 16, seed=3, dev=dev, dtype=dtype)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(4)).to(dev)
    for k in (4, 1):   # top-1 is renormalised too (gate = routed_scaling_factor)
        w, idx = routing.route(logits, bias, top_k=k, scoring="sqrtsoftplus", norm_topk_prob=True,
                               routed_scaling_factor=2.5)
        rw, ridx = ref("moe.route_sqrtsoftplus", logits, bias, top_k=k, routed_scaling_factor=2.5)
        assert torch.equal(idx, ridx) and rel_err(w, rw) < 1e-5
    table = torch.rand(11, 16, generator=torch.Generator().manual_seed(5)).argsort(-1)[:, :3].to(dev)
    ids = torch.randint(0, 11, (7,), generator=torch.Generator().manual_seed(6)).to(dev)
    w, idx = mix.route_hash(logits, table, ids, routed_scaling_factor=2.5)
    rw, ridx = ref("moe.route_hash", logits, table, ids, routed_scaling_factor=2.5)
    assert torch.equal(idx, ridx) and rel_err(w, rw) < 1e-5


def test_sqrtsoftplus_and_hash_routing_match_reference():
    _check_routes(DEV, torch.float32)


def _check_rows(dev, dtype, name, tol):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 4, 20, generator=g).to(dev, dtype)
    rms = load_kernel(rowwise.rms_norm(20, name, 1e-6, residual=False, weighted=False))
    assert rel_err(rms(x).float(), ref("norm.rms_unweighted", x, eps=1e-6)) < tol
    gu = (torch.randn(5, 2 * 24, generator=g) * 2).to(dev, dtype)   # |.| > 0.7 often: both clamps bite
    act = load_kernel(rowwise.swiglu(24, name, limit=0.7))
    assert rel_err(act(gu).float(), ref("act.swiglu_clamped", gu, limit=0.7)) < tol


def test_generated_unweighted_rms_and_clamped_swiglu():
    _check_rows(DEV, torch.float32, "float32", 1e-5)


def test_integer_neg_and_sub_are_exact_kernels():
    """Positions through the generated elementwise kernels in int64 (fp32 would round 2**40 + 1)."""
    b = GraphBuilder("positions", dtype="float32")
    p = b.input("positions", ("B", "S"), "int64")
    b.output("start", b.sub(p, b.constant(value=3, dtype="int64")))
    b.output("back", b.neg(p))
    compiled = get_backend("triton").compile(b.build(), {}, device=DEV)
    assert compiled.report.counts() == {"generated": 2} and not compiled.report.fallbacks
    pos = (torch.arange(6).reshape(2, 3) + 2 ** 40 + 1).to(DEV)
    out = compiled.run({"positions": pos})
    assert torch.equal(out["start"], pos - 3) and torch.equal(out["back"], -pos)


@pytest.mark.gpu
@needs_cuda
def test_v4_mix_kernels_bf16_gpu():
    _check_hc_pre(4, 1024, "cuda", torch.bfloat16, 1e-2)
    x = torch.randn(2, 3, 4, 1024, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(2, 3, 1024, device="cuda", dtype=torch.bfloat16)
    post, comb = torch.rand(2, 3, 4, device="cuda") * 2, torch.rand(2, 3, 4, 4, device="cuda")
    assert rel_err(mix.hc_post(x, y, post, comb).float(), ref("hc.post", x, y, post, comb)) < 1e-2
    args = _hc_inputs(4, 1024, 4, seed=9, dev="cuda", dtype=torch.bfloat16)
    assert rel_err(mix.hc_mix(*args, eps=1e-6, norm_eps=1e-6, full=False).float(),
                   ref("hc.head", *args, eps=1e-6, norm_eps=1e-6)) < 1e-2
    _check_routes("cuda", torch.bfloat16)   # both sides score the same bf16 logits in fp32: same picks
    _check_rows("cuda", torch.bfloat16, "bfloat16", 1e-2)
