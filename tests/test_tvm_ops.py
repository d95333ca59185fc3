"""Every TVM lowering (backends/tvm/lower/) against its op's torch reference, on llvm.

TVM builds are slow, so each op family is one graph with one output per lowered op, built once per module
(fixtures) with symbolic dims and run at several sizes, odd ones included: one build serving every batch and
length is itself under test. Inputs are fresh random tensors each run; floats compare by relative error
||out - ref|| / ||ref|| against the eager interpreter, integer and bool outputs exactly.
"""
import pytest
import torch

pytest.importorskip("tvm")

from dsgraph.backends import get_backend  # noqa: E402

from dsgraph.builder import GraphBuilder  # noqa: E402
from dsgraph.interpreter import run as eager_run  # noqa: E402

TOL = 1e-5


def rel(out, ref):
    """Relative error over the finite entries; infinities (masked scores) and NaNs must match exactly."""
    out, ref = out.double(), ref.double()
    finite = torch.isfinite(ref)
    if not torch.equal(out.isnan(), ref.isnan()) or not torch.equal(out[ref.isinf()], ref[ref.isinf()]):
        return float("inf")
    out, ref = out[finite], ref[finite]
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(compiled, graph, weights, inputs, tol=TOL):
    got = compiled.run(inputs)
    want = eager_run(graph, weights, inputs)
    assert set(got) == set(want)
    for name, ref in want.items():
        out = got[name]
        assert out.shape == ref.shape and out.dtype == ref.dtype, (name, out.shape, ref.shape, out.dtype, ref.dtype)
        if ref.is_floating_point():
            assert rel(out, ref) <= tol, f"{name}: rel err {rel(out, ref):.2e}"
        else:
            assert torch.equal(out, ref), f"{name}: {out} != {ref}"


def compile_tvm(graph, weights):
    return get_backend("tvm").compile(graph, weights, device="cpu")


# ------------------------------------------------------------------------------------------------ elementwise
@pytest.fixture(scope="module")
def elementwise():
    b = GraphBuilder("ew")
    x, y = b.input("x", ("B", "S", 7), "float32"), b.input("y", ("B", "S", 7), "float32")
    pos = b.input("p", ("B", "S", 7), "float32")  # positive: log, sqrt, rsqrt, div, pow
    c = b.param("c", (7,))
    for op in ("add", "sub", "mul", "maximum", "minimum", "eq", "lt", "le", "gt", "ge"):
        b.output(op, b.op(op, x, y))
    b.output("div", b.div(x, pos))
    b.output("bcast", b.add(x, c))
    for op in ("neg", "exp", "sigmoid", "silu", "tanh", "cos", "sin", "abs"):
        b.output(op, b.op(op, x))
    for op in ("log", "sqrt", "rsqrt"):
        b.output(op, b.op(op, pos))
    b.output("gelu", b.gelu(x))
    b.output("gelu_tanh", b.gelu(x, approximate="tanh"))
    b.output("pow", b.pow(pos, exponent=2.5))
    b.output("where", b.where(b.lt(x, y), x, b.constant(value=float("-inf"))))
    # a bf16 value must be materialised to be rounded: TVM keeps bf16 intermediates of a fused kernel in fp32
    bf = b.cast(x, dtype="bfloat16")
    b.output("cast_bf16", bf)
    b.output("cast_back", b.cast(bf, dtype="float32"))
    b.output("cast_int", b.cast(b.mul(x, b.constant(value=10.0)), dtype="int64"))
    b.output("const", b.add(x, b.constant(value=tuple(float(i) for i in range(7)), shape=(7,))))
    g = b.build()
    w = {"c": torch.randn(7)}
    return g, w, compile_tvm(g, w)


@pytest.mark.parametrize("bs", [(2, 3), (1, 1), (3, 5)])
def test_elementwise(elementwise, bs):
    g, w, c = elementwise
    x = torch.randn(*bs, 7)
    y = torch.where(torch.rand(*bs, 7) < 0.2, x, torch.randn(*bs, 7))  # some equal pairs for eq/le/ge
    check(c, g, w, {"x": x, "y": y, "p": torch.rand(*bs, 7) + 0.5})


# ------------------------------------------------------------------------------------------------ shape, index, GEMM
@pytest.fixture(scope="module")
def shapes():
    b = GraphBuilder("shape")
    x = b.input("x", ("B", "S", 13), "float32")
    ids = b.input("ids", ("B", "S"), "int64")
    cache = b.input("cache", ("B", "T", 13), "float32")
    gidx = b.input("gidx", ("B", "S", 4), "int64")
    rows = b.input("rows", ("N",), "int64")
    src = b.input("src", ("N", 13), "float32")
    w, bias = b.param("w", (11, 13)), b.param("bias", (11,))
    m, table, tab2 = b.param("m", (13, 3)), b.param("table", (19, 6)), b.param("tab2", (9, 13))
    b.output("linear", b.linear(x, w, bias))
    b.output("linear_nobias", b.linear(x, w))
    b.output("matmul", b.matmul(x, m))
    b.output("einsum", b.einsum(x, m, equation="bsd,de->bse"))
    flat = b.reshape(x, shape=("B*S", 13))
    b.output("reshape", flat)
    b.output("permute", b.permute(x, dims=(2, 0, 1)))
    b.output("expand", b.expand(b.reshape(ids, shape=("B", "S", 1)), shape=("B", "S", 5)))
    p1, p2, p3 = b.split(x, sizes=(4, 2, 7), dim=-1)
    b.output("split0", p1)
    b.output("split2", p3)
    b.output("slice_last", b.slice(x, dim=1, start=-1))
    b.output("slice_mid", b.slice(x, dim=2, start=2, end=9))
    b.output("concat", b.concat(p3, p1, p2, dim=2))
    b.output("append", b.cache.append(cache, x))
    b.output("embed", b.embed(ids, table))
    b.output("gather", b.gather(x, gidx, dim=2))
    b.output("scatter", b.scatter(x, gidx, b.slice(x, dim=2, start=0, end=4), dim=2))
    b.output("index_select", b.index_select(tab2, rows, dim=0))
    b.output("index_add", b.index_add(tab2, rows, src, dim=0))
    b.output("arange", b.arange_like(cache, dim=1))
    b.output("causal", b.causal_mask(x, b.cache.append(cache, x), q_dim=1, k_dim=1))
    g = b.build()
    wts = {"w": torch.randn(11, 13), "bias": torch.randn(11), "m": torch.randn(13, 3), "table": torch.randn(19, 6),
           "tab2": torch.randn(9, 13)}
    return g, wts, compile_tvm(g, wts)


@pytest.mark.parametrize("bs,t,n", [((2, 3), 0, 5), ((1, 1), 6, 1), ((3, 4), 2, 12)])
def test_shape_index_gemm(shapes, bs, t, n):
    g, w, c = shapes
    inputs = {"x": torch.randn(*bs, 13), "ids": torch.randint(0, 19, bs), "cache": torch.randn(bs[0], t, 13),
              "gidx": torch.randint(0, 13, (*bs, 4)), "rows": torch.randint(0, 9, (n,)), "src": torch.randn(n, 13)}
    check(c, g, w, inputs)


# ------------------------------------------------------------------------------------------------ reductions
@pytest.fixture(scope="module")
def reductions():
    b = GraphBuilder("reduce")
    x = b.input("x", ("B", "S", 9), "float32")
    v = b.input("v", ("N",), "int64")
    b.output("softmax", b.softmax(x, dim=-1))
    b.output("softmax1", b.softmax(x, dim=1))
    b.output("sum", b.sum(x, dims=(-1,)))
    b.output("sum_keep", b.sum(x, dims=(0, 2), keepdim=True))
    b.output("mean", b.mean(x, dims=(-1,), keepdim=True))
    b.output("amax", b.amax(x, dims=(1,)))
    b.output("argmax", b.argmax(x, dim=-1))
    vals, idx = b.topk(x, k=3, dim=-1)
    b.output("topk_v", vals)
    b.output("topk_i", idx)
    b.output("topk_small", b.topk(x, k=2, dim=-1, largest=False)[1])
    b.output("argsort", b.argsort(v, dim=0))
    b.output("argsort_desc", b.argsort(x, dim=-1, descending=True))
    b.output("cumsum", b.cumsum(v, dim=0))
    b.output("cumsum_f", b.cumsum(x, dim=1))
    b.output("bincount", b.bincount(v, length=6))
    g = b.build()
    return g, {}, compile_tvm(g, {})


@pytest.mark.parametrize("bs,n", [((2, 3), 17), ((1, 1), 1), ((4, 5), 40)])
def test_reductions(reductions, bs, n):
    g, w, c = reductions
    check(c, g, w, {"x": torch.randn(*bs, 9), "v": torch.randint(0, 6, (n,))})


# ------------------------------------------------------------------------------------------------ vision
@pytest.mark.parametrize("stride,padding,bias,dt,tol", [(1, 1, True, "float32", TOL), (2, 0, False, "float32", TOL),
                                                        (1, 1, True, "bfloat16", 1e-2)])
def test_conv2d(stride, padding, bias, dt, tol):
    """relax.nn.conv2d against the op's reference, odd sizes, with and without bias, bf16 accumulating in fp32."""
    b = GraphBuilder("conv", dt)
    x = b.input("x", ("N", 3, 9, 7), dt)
    w = b.param("w", (5, 3, 3, 3))
    bs = [b.param("b", (5,))] if bias else []
    b.output("y", b.conv2d(x, w, *bs, stride=stride, padding=padding))
    g = b.build()
    gen = torch.Generator().manual_seed(3)
    weights = {"w": torch.randn(5, 3, 3, 3, generator=gen).to(getattr(torch, dt)),
               "b": torch.randn(5, generator=gen).to(getattr(torch, dt))}
    weights = {k: v for k, v in weights.items() if k in g.inputs}
    check(compile_tvm(g, weights), g, weights, {"x": torch.randn(2, 3, 9, 7, generator=gen).to(getattr(torch, dt))},
          tol)
