"""Generated Triton kernels (RMSNorm, add+RMSNorm, SwiGLU, RoPE, fused elementwise chains) against the op
references, and the emitted sources themselves (header naming the graph nodes, --emit-dir files)."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsgraph.backends import get_backend  # noqa: E402
from dsgraph.backends.triton.codegen import elementwise, rope, rowwise  # noqa: E402
from dsgraph.backends.triton.codegen.source import load_kernel  # noqa: E402

from dsgraph import GraphBuilder  # noqa: E402
from dsgraph.interpreter import run  # noqa: E402
from dsgraph.ops.registry import get_op  # noqa: E402
from dsgraph.ops.rope import ROPE_ATTRS  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def ref(op, *args, **attrs):
    return get_op(op).reference_fn(*args, **attrs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 41), (1, 1, 7)])
def test_rms_norm_kernels(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x, r = (torch.randn(shape, generator=g).to(DEV, dtype) for _ in range(2))
    w = torch.randn(shape[-1], generator=g).to(DEV, dtype)
    rms = load_kernel(rowwise.rms_norm(shape[-1], NAMES[dtype], 1e-5, residual=False))
    assert rel_err(rms(x, w), ref("norm.rms", x, w, eps=1e-5)) < TOL[dtype]
    y, s = load_kernel(rowwise.rms_norm(shape[-1], NAMES[dtype], 1e-5, residual=True))(x, r, w)
    ry, rs = ref("norm.add_rms", x, r, w, eps=1e-5)
    assert rel_err(y, ry) < TOL[dtype] and rel_err(s, rs) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 2 * 20), (2, 3, 2 * 1100)])
def test_swiglu_kernel(shape, dtype):
    gu = torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])).to(DEV, dtype)
    out = load_kernel(rowwise.swiglu(shape[-1] // 2, NAMES[dtype]))(gu)
    assert rel_err(out, ref("act.swiglu", gu)) < TOL[dtype]


ROPES = [
    dict(),
    dict(interleaved=True),
    dict(scaling="yarn", factor=4.0, original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=0.707,
         interleaved=True),
    dict(scaling="llama3", factor=8.0, original_max_position_embeddings=64, theta=500000.0),
    dict(scaling="linear", factor=4.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("attrs", ROPES, ids=lambda a: f"{a.get('scaling', 'none')}-{a.get('interleaved', False)}")
@pytest.mark.parametrize("shape", [(2, 3, 4, 16), (1, 5, 3, 2, 24), (1, 2, 1, 8)])
def test_rope_kernel(shape, attrs, dtype):
    from dsgraph.ops.rope import rope_frequencies
    full = {k: a.default for k, a in ROPE_ATTRS.items()}
    full.update(attrs)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g).to(DEV, dtype)
    pos = torch.randint(0, 300, shape[:2], generator=g).to(DEV)
    inv_freq, mult = rope_frequencies(full, shape[-1])
    heads = 1
    for d in shape[2:-1]:
        heads *= d
    fn = load_kernel(rope.rope(shape[-1], heads, NAMES[dtype], full["interleaved"], mult))
    assert rel_err(fn(x, pos, inv_freq.to(DEV)), ref("rope", x, pos, **full)) < TOL[dtype]


def test_rope_reads_strided_views():
    x = torch.randn(2, 3, 4, 24, device=DEV)
    view = x[..., 16:]  # the q_pe half of a [nope | rope] split
    full = {k: a.default for k, a in ROPE_ATTRS.items()}
    fn = load_kernel(rope.rope(8, 4, "float32", False, 1.0))
    from dsgraph.ops.rope import rope_frequencies
    pos = torch.arange(3, device=DEV).expand(2, 3)
    assert rel_err(fn(view, pos, rope_frequencies(full, 8)[0].to(DEV)), ref("rope", view, pos, **full)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("attrs", ROPES[1:3], ids=["interleaved", "yarn"])
def test_mla_cache_row_equals_rms_rope_concat(attrs, dtype):
    """One program per token writes [RMSNorm(c_kv) | RoPE(k_pe)] (mla.latent_row's reference); c_kv and k_pe are
    views into one projection's output (as merge_qkv_a leaves them), ragged widths (C=40, R=12). The same rows go
    into a cache at rows T.. (mode 0), at device-side rows (mode 1) and at flat pool slots (mode 2), touching
    nothing else."""
    from dsgraph.ops.rope import rope_frequencies
    full = {k: a.default for k, a in ROPE_ATTRS.items()}
    full.update(attrs)
    g = torch.Generator().manual_seed(11)
    kv = torch.randn(2, 3, 24 + 40 + 12, generator=g).to(DEV, dtype)
    c_kv, k_pe = kv[..., 24:64], kv[..., 64:]
    w = torch.randn(40, generator=g).to(DEV, dtype)
    pos = torch.randint(0, 300, (2, 3), generator=g).to(DEV)
    inv_freq, mult = rope_frequencies(full, 12)
    inv_freq = inv_freq.to(DEV)
    fn = load_kernel(rope.mla_cache_row(40, 12, NAMES[dtype], 1e-6, full["interleaved"], mult))
    row = fn(c_kv, k_pe, w, pos, inv_freq)
    want = ref("mla.latent_row", c_kv, k_pe, w, pos, eps=1e-6, **full)
    assert row.shape == (2, 3, 52) and row.dtype == dtype
    assert rel_err(row, want) < TOL[dtype]
    cache = torch.randn(2, 9, 52, generator=g).to(DEV, dtype)
    for mode, rows, start, at in ((0, None, 4, [4, 5, 6]), (1, torch.tensor([6, 2, 7], device=DEV), 0, [6, 2, 7])):
        out = cache.clone()
        fn(c_kv, k_pe, w, pos, inv_freq, out, rows, start, mode)
        assert rel_err(out[:, at], want) < TOL[dtype]
        rest = [i for i in range(9) if i not in at]
        assert torch.equal(out[:, rest], cache[:, rest])
    slots = torch.tensor([[5, 0, 9], [3, 11, 1]], device=DEV)
    pool = cache.clone().view(-1, 52)
    fn(c_kv, k_pe, w, pos, inv_freq, pool, slots.reshape(-1), 0, 2)
    assert rel_err(pool[slots.reshape(-1)], want.reshape(6, 52)) < TOL[dtype]


def test_elementwise_chain_source_and_numerics():
    ins = [elementwise.EwInput("in0", "float32", "full", label="%x"),
           elementwise.EwInput("in1", "float32", "suffix", 5, "%b")]
    ops = [elementwise.EwOp("v0", "add", ("in0", "in1"), "float32", "%a = add(%x, %b)"),
           elementwise.EwOp("v1", "mul", ("v0", "0.5"), "float32", "%m = mul(%a, 0.5)"),
           elementwise.EwOp("v2", "cast", ("v1",), "float16", "%c = cast(%m)")]
    src = elementwise.fused_elementwise("ew_test", ins, ops, [("v0", "float32"), ("v2", "float16")], "test chain")
    src.nodes.extend(op.label for op in ops)
    assert "%a = add(%x, %b)" in src.text.split('"""')[1]
    x, b = torch.randn(3, 7, 5, device=DEV), torch.randn(5, device=DEV)
    a, c = load_kernel(src)((3, 7, 5), x, b)
    assert torch.equal(a, x + b) and c.dtype == torch.float16 and torch.equal(c, ((x + b) * 0.5).half())


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_elementwise_gelu_over_a_row_broadcast(approximate):
    """gelu (both forms) in a chain whose other input is a [.., 1] keepdim row value against [.., N]."""
    ins = [elementwise.EwInput("in0", "float32", "full", label="%x"),
           elementwise.EwInput("in1", "float32", "rows", 5, "%r")]
    ops = [elementwise.EwOp("v0", "mul", ("in0", "in1"), "float32", "%m = mul(%x, %r)"),
           elementwise.EwOp("v1", "gelu", ("v0",), "float32", "%g = gelu(%m)", approximate=approximate)]
    src = elementwise.fused_elementwise("ew_gelu", ins, ops, [("v1", "float32")], "gelu chain")
    g = torch.Generator().manual_seed(4)
    x, r = torch.randn(3, 7, 5, generator=g).to(DEV) * 3, torch.randn(3, 7, 1, generator=g).to(DEV)
    (y,) = load_kernel(src)((3, 7, 5), x, r)
    assert rel_err(y, get_op("gelu").reference_fn(x * r, approximate=approximate)) < 1e-6


def _toy_graph():
    b = GraphBuilder("toy", dtype="float32")
    x = b.input("x", ("B", "S", 24), "float32")
    r = b.input("r", ("B", "S", 24), "float32")
    y, s = b.norm.add_rms(x, r, b.param("w", (24,)), eps=1e-6, name="n")
    h = b.mul(b.silu(b.add(y, b.param("bias", (24,)))), s, name="gated")
    b.output("out", b.cast(h, dtype="float16", name="out"))
    return b.build(), {"w": torch.randn(24), "bias": torch.randn(24)}


def test_backend_emits_every_generated_kernel_with_node_headers(tmp_path):
    graph, weights = _toy_graph()
    compiled = get_backend("triton").compile(graph, weights, device=DEV, emit_dir=str(tmp_path))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == len(compiled.sources) == 2
    texts = [p.read_text() for p in tmp_path.iterdir()]
    chain = next(t for t in texts if "fused elementwise" in t)
    for name in ("%add = add(%n.0, %bias)", "%silu = silu(%add)", "%gated = mul(%silu, %n.1)", "%out = cast(%gated)"):
        assert name in chain.split('"""')[1]
    assert any("norm.add_rms" in t and "@triton.jit" in t for t in texts)
    inputs = {"x": torch.randn(2, 3, 24), "r": torch.randn(2, 3, 24)}
    assert rel_err(compiled.run(inputs)["out"], run(graph, weights, inputs)["out"]) < 2e-3
    assert compiled.report.counts() == {"generated": 2}
