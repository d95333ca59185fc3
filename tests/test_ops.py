"""Primitive ops: every shape rule (good and bad inputs) and every reference against plain
torch written here, on fresh random inputs of several shapes (odd ones included).

Domain ops live in test_ops_domain.py. A coverage test fails when an op is
registered without a case here.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsgraph import GraphBuilder, ShapeError, TensorType, run
from dsgraph.ops import all_ops, get_op
from dsgraph.ops.common import broadcast

G = torch.Generator().manual_seed(7)


def R(*shape):
    return torch.randn(shape, generator=G)


def P(*shape):  # positive
    return torch.rand(shape, generator=G) + 0.1


def RI(hi, *shape):
    return torch.randint(0, hi, shape, generator=G)


def one_node(op, tensors, **attrs):
    """Run `op` on concrete activation inputs through a one-node graph; returns the output tensor(s)."""
    b = GraphBuilder(op)
    vals = [b.input(f"in{i}", tuple(t.shape), str(t.dtype).removeprefix("torch.")) for i, t in enumerate(tensors)]
    out = b.op(op, *vals, **attrs)
    outs = out if isinstance(out, tuple) else (out,)
    for i, v in enumerate(outs):
        b.output(f"out{i}", v)
    res = run(b.build(), {}, {f"in{i}": t for i, t in enumerate(tensors)})
    got = [res[f"out{i}"] for i in range(len(outs))]
    return got if isinstance(out, tuple) else got[0]


def assert_close(got, want, tol=1e-5):
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.is_floating_point():
        want = want.to(got.dtype)
        inf = torch.isinf(want.float())   # masked entries (-inf logits): the same ones, the rest compared by norm
        assert torch.equal(inf, torch.isinf(got.float())) and torch.equal(got.float()[inf], want.float()[inf])
        got, want = got.float().masked_fill(inf, 0), want.float().masked_fill(inf, 0)
        err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
        assert err <= tol, err
    else:
        assert got.dtype == want.dtype and torch.equal(got, want)


# ---------------------------------------------------------------- references
REF = []


def ref(op, shapes, make, want, **attrs):
    for s in shapes:
        REF.append(pytest.param(op, s, make, want, attrs, id=f"{op}-{s}"))


BIN_SHAPES = [((3, 4), (4,)), ((2, 1, 5), (3, 1)), ((7,), (7,)), ((1,), (2, 3))]
two = lambda sa, sb: (R(*sa), R(*sb))
ref("add", BIN_SHAPES, two, lambda a, b: a + b)
ref("sub", BIN_SHAPES, two, lambda a, b: a - b)
ref("mul", BIN_SHAPES, two, lambda a, b: a * b)
ref("div", BIN_SHAPES, lambda sa, sb: (R(*sa), P(*sb)), lambda a, b: a * (1.0 / b))
ref("maximum", BIN_SHAPES, two, lambda a, b: torch.where(a > b, a, b))
ref("minimum", BIN_SHAPES, two, lambda a, b: torch.where(a < b, a, b))
ints = lambda sa, sb: (RI(3, *sa), RI(3, *sb))  # small ints: plenty of ties
for _op, _f in {"eq": lambda a, b: a == b, "lt": lambda a, b: a < b, "le": lambda a, b: ~(a > b),
                "gt": lambda a, b: b < a, "ge": lambda a, b: ~(a < b)}.items():
    ref(_op, BIN_SHAPES, ints, _f)

UN_SHAPES = [(5,), (3, 7), (2, 3, 4)]
sig = lambda x: 1 / (1 + torch.exp(-x))
ref("neg", UN_SHAPES, lambda *s: (R(*s),), lambda x: 0 - x)
ref("abs", UN_SHAPES, lambda *s: (R(*s),), lambda x: torch.where(x < 0, -x, x))
ref("exp", UN_SHAPES, lambda *s: (R(*s),), lambda x: math.e ** x)
ref("log", UN_SHAPES, lambda *s: (P(*s),), lambda x: torch.log2(x) * math.log(2))
ref("sqrt", UN_SHAPES, lambda *s: (P(*s),), lambda x: x ** 0.5)
ref("rsqrt", UN_SHAPES, lambda *s: (P(*s),), lambda x: 1 / x ** 0.5)
ref("sigmoid", UN_SHAPES, lambda *s: (R(*s),), sig)
ref("silu", UN_SHAPES, lambda *s: (R(*s),), lambda x: x * sig(x))
ref("tanh", UN_SHAPES, lambda *s: (R(*s),), lambda x: 2 * sig(2 * x) - 1)
ref("cos", UN_SHAPES, lambda *s: (R(*s),), lambda x: torch.sin(x + math.pi / 2))
ref("sin", UN_SHAPES, lambda *s: (R(*s),), lambda x: torch.cos(x - math.pi / 2))
ref("gelu", UN_SHAPES, lambda *s: (R(*s),), lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))))
ref("gelu", UN_SHAPES, lambda *s: (R(*s),),
    lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))), approximate="tanh")
ref("pow", UN_SHAPES, lambda *s: (P(*s),), lambda x: torch.exp(2.5 * torch.log(x)), exponent=2.5)
ref("where", [((3, 4), (3, 4), (3, 4)), ((4,), (2, 4), ()), ((2, 1), (1, 3), (2, 3))],
    lambda sc, sa, sb: (torch.rand(sc, generator=G) > 0.5, R(*sa), R(*sb)),
    lambda c, a, b: c * a + (~c) * b)
ref("cast", UN_SHAPES, lambda *s: (R(*s),), lambda x: x.to(torch.bfloat16), dtype="bf16")
ref("cast", UN_SHAPES, lambda *s: (R(*s) * 10,), lambda x: torch.trunc(x).long(), dtype="int64")
ref("act.swiglu", [(3, 8), (2, 5, 6)], lambda *s: (R(*s),),
    lambda x: x[..., : x.shape[-1] // 2] * sig(x[..., : x.shape[-1] // 2]) * x[..., x.shape[-1] // 2:])

MM = lambda a, b: (a[..., :, :, None] * b[..., None, :, :]).sum(-2)
ref("linear", [((3, 5), (4, 5)), ((2, 3, 5), (1, 5)), ((1, 9), (7, 9))], two, lambda x, w: MM(x, w.T))
ref("linear", [((2, 3, 5), (4, 5), (4,))], lambda *s: tuple(R(*x) for x in s), lambda x, w, b: MM(x, w.T) + b)
ref("matmul", [((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 6)), ((3, 3), (3, 1))], two, MM)
ref("einsum", [((2, 3, 4, 5), (4, 5, 6))], two,
    lambda a, b: (a[..., None] * b[None, None]).sum(-2), equation="bshd,hdc->bshc")
ref("einsum", [((2, 5, 3), (2, 7, 3))], two, lambda a, b: MM(a, b.transpose(1, 2)), equation="bik,bjk->bij")

ref("softmax", UN_SHAPES, lambda *s: (R(*s),), lambda x: torch.exp(x) / torch.exp(x).sum(-1, keepdim=True))
ref("softmax", [(4, 3), (2, 3, 5)], lambda *s: (R(*s),), lambda x: torch.exp(x) / torch.exp(x).sum(0), dim=0)


for _keep in (False, True):
    ref("sum", [(3, 4, 5)], lambda *s: (R(*s),), lambda x, k=_keep: x.sum((0, 2), keepdim=k), dims=(0, -1),
        keepdim=_keep)
    ref("mean", [(3, 4, 5)], lambda *s: (R(*s),), lambda x, k=_keep: x.sum(1, keepdim=k) / 4, dims=(1,),
        keepdim=_keep)
    ref("amax", [(3, 4, 5)], lambda *s: (R(*s),), lambda x, k=_keep: -(-x).amin(2, keepdim=k), dims=(2,),
        keepdim=_keep)
ref("sum", [(6,), (2, 9)], lambda *s: (RI(5, *s),), lambda x: x.sum(0), dims=(0,))
ref("argmax", UN_SHAPES, lambda *s: (R(*s),), lambda x: x.sort(-1, descending=True).indices[..., 0])
ref("argmax", [(3, 4)], lambda *s: (R(*s),), lambda x: x.sort(0, descending=True).indices[:1], dim=0, keepdim=True)
ref("topk", [(3, 7), (2, 4, 5)], lambda *s: (R(*s),),
    lambda x: tuple(t[..., :3] for t in x.sort(-1, descending=True)), k=3)
ref("topk", [(6, 2)], lambda *s: (R(*s),), lambda x: tuple(t[:2] for t in x.sort(0)), k=2, dim=0, largest=False)

ref("reshape", [(2, 3, 4)], lambda *s: (R(*s),), lambda x: x.flatten(0, 1), shape=(6, 4))
ref("reshape", [(2, 6)], lambda *s: (R(*s),), lambda x: x.unflatten(1, (3, 2)).unsqueeze(0), shape=(1, 2, 3, 2))
ref("permute", [(2, 3, 4)], lambda *s: (R(*s),), lambda x: x.movedim(2, 0), dims=(2, 0, 1))
ref("expand", [(3, 1)], lambda *s: (R(*s),), lambda x: x.repeat(1, 5), shape=(3, 5))
ref("split", [(4, 7)], lambda *s: (R(*s),), lambda x: (x[:, :2], x[:, 2:3], x[:, 3:]), sizes=(2, 1, 4))
ref("split", [(5, 3)], lambda *s: (R(*s),), lambda x: (x[:4], x[4:]), sizes=(4, 1), dim=0)
ref("slice", [(4, 6)], lambda *s: (R(*s),), lambda x: x[:, 1:4], dim=1, start=1, end=4)
ref("slice", [(5, 3)], lambda *s: (R(*s),), lambda x: x[3:], dim=0, start=3)
ref("slice", [(2, 5, 3)], lambda *s: (R(*s),), lambda x: x[:, 4:], dim=1, start=-1)
ref("concat", [((2, 3), (2, 5), (2, 1))], lambda *s: tuple(R(*x) for x in s),
    lambda *xs: torch.stack([torch.tensor([v for x in xs for v in x[i].tolist()]) for i in range(2)]), dim=1)
ref("concat", [((1, 3), (4, 3))], lambda *s: tuple(R(*x) for x in s), lambda a, b: torch.cat([a, b]), dim=0)

ref("embed", [((2, 5), (11, 4)), ((7,), (3, 2))], lambda si, sw: (RI(sw[0], *si), R(*sw)),
    lambda ids, w: torch.stack([w[i] for i in ids.flatten().tolist()]).reshape(*ids.shape, w.shape[1]))


def _gather_loop(x, idx):
    out = torch.empty(idx.shape)
    for i in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            out[i, j] = x[i, idx[i, j]]
    return out


ref("gather", [((3, 5), (3, 2)), ((1, 4), (1, 4))], lambda sx, si: (R(*sx), RI(sx[1], *si)), _gather_loop, dim=1)


def _scatter_loop(x, idx, src):
    out = x.clone()
    for i in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            out[i, idx[i, j]] = src[i, j]
    return out


ref("scatter", [((3, 6), (3, 2))], lambda sx, si: (R(*sx), torch.stack([torch.randperm(sx[1], generator=G)[:si[1]]
                                                                         for _ in range(si[0])]), R(*si)),
    _scatter_loop, dim=1)


def _index_add_loop(x, idx, src):
    out = x.clone()
    for i, t in enumerate(idx.tolist()):
        out[t] += src[i]
    return out


ref("index_add", [((4, 3), 6), ((2, 5), 1)], lambda sx, n: (R(*sx), RI(sx[0], n), R(n, sx[1])), _index_add_loop)
ref("index_add", [((4,), 9)], lambda sx, n: (RI(5, *sx), RI(sx[0], n), RI(5, n)), _index_add_loop)
ref("index_select", [((5, 3), 7)], lambda sx, n: (R(*sx), RI(sx[0], n)), lambda x, i: x[i.tolist()])
ref("index_select", [((2, 5), 3)], lambda sx, n: (R(*sx), RI(sx[1], n)), lambda x, i: x[:, i.tolist()], dim=1)
ref("arange_like", [(3, 5)], lambda *s: (R(*s),), lambda x: torch.tensor(list(range(5))), dim=1)
ref("causal_mask", [((1, 3), (1, 3)), ((2, 2, 4), (2, 5, 4)), ((1, 1), (1, 6))], two,
    lambda q, k: torch.tensor([[j <= i + k.shape[1] - q.shape[1] for j in range(k.shape[1])]
                               for i in range(q.shape[1])]))
ref("constant", [()], lambda: (), lambda: torch.full((2, 3), 1.5), value=1.5, shape=(2, 3))
ref("constant", [()], lambda: (), lambda: torch.tensor([[1, 2], [3, 4]]), value=(1, 2, 3, 4), shape=(2, 2),
    dtype="int64")

ref("argsort", [(9,), (3, 8)], lambda *s: (RI(4, *s),),  # ints with ties: stability matters
    lambda x: torch.tensor([sorted(range(x.shape[-1]), key=lambda j: (row[j], j)) for row in x.reshape(-1, x.shape[-1]).tolist()]).reshape(x.shape))  # noqa: E501
ref("argsort", [(7,)], lambda *s: (RI(3, *s),),
    lambda x: torch.tensor(sorted(range(7), key=lambda j: (-x[j].item(), j))), descending=True)


def _cumsum_loop(x, dim=0):
    out, acc = [], 0
    for v in x.unbind(dim):
        acc = acc + v
        out.append(acc)
    return torch.stack(out, dim)


ref("cumsum", [(6,), (4, 3)], lambda *s: (RI(5, *s),), _cumsum_loop, dim=0)
ref("cumsum", [(3, 5)], lambda *s: (R(*s),), lambda x: _cumsum_loop(x, 1), dim=1)
ref("bincount", [(10,), (1,), (0,)], lambda *s: (RI(4, *s),),
    lambda x: torch.tensor([x.tolist().count(v) for v in range(6)]), length=6)


@pytest.mark.parametrize("op,shape,make,want,attrs", REF)
def test_reference(op, shape, make, want, attrs):
    tensors = make(*shape) if isinstance(shape, tuple) else make(shape)
    got, exp = one_node(op, tensors, **attrs), want(*tensors)
    if isinstance(exp, tuple):
        for g, e in zip(got, exp):
            assert_close(g, e)
    else:
        assert_close(got, exp)


def test_bincount_out_of_range_is_an_input_error():
    with pytest.raises(Exception, match=r"bincount.*values must lie in 0\.\.3.*raise `length`"):
        one_node("bincount", [torch.tensor([0, 4])], length=4)


# ---------------------------------------------------------------- shape rules
def types(*specs):
    return [TensorType(tuple(s), d) for s, d in specs]


F, L, B = "float32", "int64", "bool"
GOOD = [  # op, input types, attrs, expected output types
    ("add", types((("B", "S", 4), F), ((4,), F)), {}, types((("B", "S", 4), F))),
    ("mul", types((("B", 1), F), ((1, "S"), F)), {}, types((("B", "S"), F))),
    ("lt", types((("N",), L), ((), L)), {}, types((("N",), B))),
    ("exp", types((("B", 3), F)), {}, types((("B", 3), F))),
    ("neg", types((("B",), L)), {}, types((("B",), L))),
    ("where", types((("S", "T"), B), (("B", 1, "S", "T"), F), ((), F)), {}, types((("B", 1, "S", "T"), F))),
    ("cast", types((("B",), F)), {"dtype": "bf16"}, types((("B",), "bfloat16"))),
    ("constant", [], {"value": 0.5, "shape": (2, 3)}, types(((2, 3), F))),
    ("linear", types((("B", "S", 8), F), ((5, 8), F), ((5,), F)), {}, types((("B", "S", 5), F))),
    ("matmul", types((("B", 1, "S", 4), F), ((3, 4, "T"), F)), {}, types((("B", 3, "S", "T"), F))),
    ("einsum", types((("B", "S", 2, 3), F), ((2, 3, 7), F)), {"equation": "bshd,hdc->bshc"},
     types((("B", "S", 2, 7), F))),
    ("softmax", types((("B", "S"), F)), {}, types((("B", "S"), F))),
    ("sum", types((("B", "S", 4), F)), {"dims": (1,), "keepdim": True}, types((("B", 1, 4), F))),
    ("argmax", types((("B", 5), F)), {}, types((("B",), L))),
    ("topk", types((("N", 8), F)), {"k": 2}, types((("N", 2), F), (("N", 2), L))),
    ("reshape", types((("B", "S", 4), F)), {"shape": ("B*S", 2, 2)}, types((("B*S", 2, 2), F))),
    ("permute", types((("B", "S", 4), F)), {"dims": (2, 0, 1)}, types(((4, "B", "S"), F))),
    ("expand", types((("B", 1, 4), F)), {"shape": ("B", "T", 4)}, types((("B", "T", 4), F))),
    ("split", types((("B", 10), F)), {"sizes": (3, 7)}, types((("B", 3), F), (("B", 7), F))),
    ("slice", types((("B", "T", 4), F)), {"dim": 1, "start": -1}, types((("B", 1, 4), F))),
    ("slice", types((("B", "T", 4), F)), {"dim": 1, "start": 2}, types((("B", "T-2", 4), F))),
    ("concat", types((("B", "T", 4), F), (("B", "S", 4), F)), {"dim": 1}, types((("B", "S+T", 4), F))),
    ("embed", types((("B", "S"), L), ((10, 4), F)), {}, types((("B", "S", 4), F))),
    ("gather", types((("N", 8), F), (("N", 2), L)), {"dim": 1}, types((("N", 2), F))),
    ("scatter", types((("N", 8), B), (("N", 2), L), (("N", 2), B)), {"dim": 1}, types((("N", 8), B))),
    ("index_add", types((("N", 4), F), (("M",), L), (("M", 4), F)), {}, types((("N", 4), F))),
    ("index_select", types((("N", 4), F), (("M",), L)), {}, types((("M", 4), F))),
    ("arange_like", types((("B", "S"), F)), {"dim": 1}, types((("S",), L))),
    ("causal_mask", types((("B", "S", 4), F), (("B", "T+S", 4), F)), {}, types((("S", "S+T"), B))),
    ("argsort", types((("N",), L)), {"dim": 0}, types((("N",), L))),
    ("cumsum", types((("N", 3), L)), {"dim": 0}, types((("N", 3), L))),
    ("bincount", types((("N",), "int32")), {"length": 5}, types(((5,), L))),
    ("act.swiglu", types((("N", 8), F)), {}, types((("N", 4), F))),
]

BAD = [  # op, input types, attrs, a regex the rule's own message must match
    ("add", types(((3, 4), F), ((5,), F)), {}, r"cannot broadcast .*dim -1: 4 vs 5"),
    ("sub", types(((3,), F), ((3,), "bfloat16")), {}, r"dtypes differ.*insert a cast"),
    ("eq", types(((3,), F), ((3,), L)), {}, r"dtypes differ"),
    ("exp", types(((3,), L)), {}, r"exp input must be a float tensor, got int64\[3\]"),
    ("where", types(((3,), F), ((3,), F), ((3,), F)), {}, r"condition must be bool, got float32\[3\]"),
    ("cast", types(((3,), F)), {"dtype": "complex"}, r"unsupported dtype 'complex'"),
    ("constant", [], {"value": (1.0, 2.0), "shape": (3,)}, r"2 values for shape \(3,\)"),
    ("constant", [], {"value": 1.0, "shape": ("B",)}, r"constant shape must be ints"),
    ("linear", types(((2, 5), F), ((4, 6), F)), {}, r"input features 5 != weight in-features 6"),
    ("linear", types(((2, 5), F), ((4, 5), F), ((5,), F)), {}, r"bias must be \[4\]"),
    ("matmul", types(((2, 3), F), ((4, 5), F)), {}, r"inner dims differ"),
    ("matmul", types(((3,), F), ((3, 5), F)), {}, r"rank >= 2"),
    ("einsum", types(((2, 3), F), ((4, 5), F)), {"equation": "ij,jk->ik"}, r"letter 'j' is 3 and 4"),
    ("einsum", types(((2, 3), F), ((3, 5), F)), {"equation": "ij,jk"}, r"must be 'xy,yz->xz'"),
    ("softmax", types(((2, 3), F)), {"dim": 2}, r"dim=2 is out of range for rank 2"),
    ("sum", types(((2, 3), F)), {"dims": (-3,)}, r"out of range"),
    ("argmax", types(((2, 3), F)), {"dim": 5}, r"out of range"),
    ("topk", types(((2, 3), F)), {"k": 4}, r"topk k=4 must be in 1\.\.3"),
    ("reshape", types((("B", 4), F)), {"shape": ("B", 3)}, r"changes the element count"),
    ("permute", types(((2, 3), F)), {"dims": (0, 0)}, r"not a permutation"),
    ("expand", types(((2, 3), F)), {"shape": (4, 3)}, r"expand float32\[2, 3\] to \('4', '3'\)"),
    ("expand", types(((2, 3), F)), {"shape": (2, 3, 1)}, r"rank 2 to 3"),
    ("split", types(((2, 10), F)), {"sizes": (3, 6)}, r"sum to 9.*is 10"),
    ("slice", types(((2, 3), F)), {"dim": 1, "start": 1, "end": 5}, r"slice takes 4 of 3"),
    ("slice", types(((2, 3), F)), {"dim": 1, "start": 2, "end": 1}, r"0 <= start <= end"),
    ("concat", types(((2, 3), F), ((3, 3), F)), {"dim": 1}, r"shapes differ off that dim"),
    ("embed", types(((2,), F), ((10, 4), F)), {}, r"embed ids must be int64 or int32"),
    ("embed", types(((2,), L), ((10,), F)), {}, r"embed weight must be \[vocab, dim\]"),
    ("gather", types(((2, 3), F), ((2,), L)), {"dim": 1}, r"index rank 1 != input rank 2"),
    ("scatter", types(((2, 3), F), ((2, 2), L), ((2, 1), F)), {"dim": 1}, r"shapes differ"),
    ("index_add", types(((2, 3), F), ((2, 1), L), ((2, 3), F)), {}, r"index must be 1-D"),
    ("index_select", types(((2, 3), F), ((2,), F)), {}, r"index must be int64 or int32"),
    ("arange_like", types(((2, 3), F)), {"dim": 2}, r"out of range"),
    ("causal_mask", types(((2, 3), F), ((2, 3), F)), {"q_dim": 3}, r"out of range"),
    ("argsort", types(((3,), B)), {}, r"must be numeric"),
    ("cumsum", types(((3,), F)), {"dim": 1}, r"out of range"),
    ("bincount", types(((2, 3), L)), {"length": 4}, r"must be 1-D"),
    ("bincount", types(((3,), F)), {"length": 4}, r"must be int64 or int32"),
    ("act.swiglu", types(((2, 7), F)), {}, r"must be even"),
    ("neg", types(((2,), F), ((2,), F)), {}, r"neg takes inputs \(x\), got 2 inputs"),
    ("softmax", types(((2,), F)), {"axis": 0}, r"unknown attribute\(s\) \['axis'\]"),
    ("topk", types(((2,), F)), {}, r"missing required attribute 'k'"),
    ("topk", types(((2,), F)), {"k": 1.5}, r"attribute k=1.5 should be int"),
    ("gelu", types(((2,), F)), {"approximate": "fast"}, r"approximate='fast' not in"),
]

for _op in ("add", "sub", "mul", "div", "maximum", "minimum"):
    GOOD.append((_op, types((("B", "S", 1), F), (("S", 5), F)), {}, types((("B", "S", 5), F))))
    BAD.append((_op, types((("B", 4), F), ((3,), F)), {}, r"cannot broadcast"))
for _op in ("eq", "lt", "le", "gt", "ge"):
    GOOD.append((_op, types((("N", 1), L), ((3,), L)), {}, types((("N", 3), B))))
    BAD.append((_op, types(((2,), F), ((3,), F)), {}, r"cannot broadcast"))
for _op in ("exp", "log", "sqrt", "rsqrt", "sigmoid", "silu", "tanh", "cos", "sin", "gelu"):
    GOOD.append((_op, types((("B", "S"), "bfloat16")), {}, types((("B", "S"), "bfloat16"))))
    BAD.append((_op, types(((2,), L)), {}, rf"{_op} input must be a float tensor"))
GOOD += [("abs", types((("N",), L)), {}, types((("N",), L))),
         ("pow", types((("N",), F)), {"exponent": 2}, types((("N",), F))),
         ("mean", types((("B", "S", 4), F)), {"dims": (-1,)}, types((("B", "S"), F))),
         ("amax", types((("B", "S", 4), F)), {"dims": (0, 1)}, types(((4,), F)))]
BAD += [("abs", types(((2,), F), ((2,), F)), {}, r"takes inputs"),
        ("pow", types(((2,), F)), {"exponent": "2"}, r"exponent='2' should be float"),
        ("pow", types(((2,), L)), {"exponent": 2.0}, r"pow input must be a float tensor"),
        ("mean", types(((2,), F)), {"dims": (1,)}, r"out of range"),
        ("mean", types(((2,), L)), {"dims": (0,)}, r"mean input must be a float tensor"),
        ("amax", types(((2,), F)), {}, r"missing required attribute 'dims'")]


def conv_loop(x, w, bias, stride=1, padding=0):
    """Each output pixel as a dot product with the flattened kernel."""
    x = torch.nn.functional.pad(x, (padding,) * 4)
    k = w.shape[-1]
    oh, ow = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = torch.zeros(x.shape[0], w.shape[0], oh, ow)
    for i in range(oh):
        for j in range(ow):
            tile = x[:, :, i * stride:i * stride + k, j * stride:j * stride + k].reshape(x.shape[0], -1)
            out[:, :, i, j] = tile @ w.reshape(w.shape[0], -1).T + (0 if bias is None else bias)
    return out


ref("conv2d", [((2, 3, 7, 6), 3, 1, 1)], lambda s, k, st, p: (R(*s), R(4, s[1], k, k), R(4)),
    lambda x, w, b: conv_loop(x, w, b, 1, 1), padding=1)
ref("conv2d", [((1, 2, 9, 8), 3, 2, 0)], lambda s, k, st, p: (R(*s), R(5, s[1], k, k)),
    lambda x, w: conv_loop(x, w, None, 2, 0), stride=2)
GOOD += [("conv2d", types((("N", 4, 6, 6), F), ((8, 4, 3, 3), F), ((8,), F)), {"padding": 1},
          types((("N", 8, 6, 6), F)))]
BAD += [("conv2d", types(((1, 3, 6, 6), F), ((8, 4, 3, 3), F)), {}, r"does not fit x"),
        ("conv2d", types(((1, 4, 6, 6), F), ((8, 4, 3, 3), F), ((7,), F)), {}, r"bias must be \[8\]")]


def _graph_inputs(b, in_types):
    return [b.input(f"x{i}", t.shape, t.dtype) for i, t in enumerate(in_types)]


@pytest.mark.parametrize("op,in_types,attrs,out_types", GOOD, ids=[f"{c[0]}-{i}" for i, c in enumerate(GOOD)])
def test_shape_rule_good(op, in_types, attrs, out_types):
    b = GraphBuilder()
    out = b.op(op, *_graph_inputs(b, in_types), **attrs)
    outs = out if isinstance(out, tuple) else (out,)
    assert [v.type for v in outs] == out_types


@pytest.mark.parametrize("op,in_types,attrs,pattern", BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD)])
def test_shape_rule_bad(op, in_types, attrs, pattern):
    b = GraphBuilder()
    vals = _graph_inputs(b, in_types)
    with pytest.raises(ShapeError, match=pattern) as info:
        b.op(op, *vals, **attrs)
    msg = str(info.value)
    assert f"while building {op}(" in msg  # names the op ...
    assert all(f"%{v.name}: {v.type}" in msg for v in vals)  # ... and the types it found
    assert len(b.graph.nodes) == 0  # nothing half-built is left behind


def test_every_primitive_op_has_cases():
    prims = {op.name for op in all_ops("primitive")}
    for table, what in ((REF, "reference"), (GOOD, "good shape rule"), (BAD, "bad shape rule")):
        names = {p.values[0] if hasattr(p, "values") else p[0] for p in table}
        assert prims - names == set(), f"primitive ops without a {what} case"


def test_ops_are_documented_and_complete():
    for op in all_ops():
        assert op.doc and op.infer_fn and op.reference_fn, op.name
        assert op.level in ("primitive", "domain", "collective")


# ---------------------------------------------------------------- broadcasting (property test)
dims_st = st.lists(st.integers(1, 4), min_size=0, max_size=4)


@settings(max_examples=60, deadline=None)
@given(dims_st, dims_st, st.data())
def test_broadcast_agrees_with_torch(a, b, data):
    # make the shapes broadcast-compatible half the time by setting random dims to 1
    a = [1 if data.draw(st.booleans()) else d for d in a]
    ta, tb = TensorType(tuple(a), F), TensorType(tuple(b), F)
    try:
        want = tuple(torch.broadcast_shapes(tuple(a), tuple(b)))
    except RuntimeError:
        with pytest.raises(ShapeError, match="cannot broadcast"):
            broadcast(ta, tb)
        return
    assert broadcast(ta, tb) == want


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["B", "S", 1, 3]), min_size=1, max_size=3))
def test_broadcast_symbolic_with_ones(shape):
    t = TensorType(tuple(shape), F)
    ones = TensorType((1,) * len(shape), F)
    assert broadcast(t, ones) == t.shape == broadcast(ones, t)
    assert get_op("add").infer_types([t, ones], {})[0] == t
