"""Primitive ops: the small vocabulary every backend implements and that
legalization lowers domain ops into."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..dtypes import dtype_name, to_torch
from ..errors import InputError, ShapeError
from ..symbolic import parse_dim
from ..types import TensorType
from .common import broadcast, dims, expect_float, expect_int, f32, norm_dim, same_dtype
from .registry import Attr, defop, expect

# ---------------------------------------------------------------- elementwise
BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "maximum": torch.maximum, "minimum": torch.minimum,
}
COMPARE = {"eq": torch.eq, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge}
UNARY = {
    "neg": torch.neg, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "sigmoid": torch.sigmoid, "silu": F.silu, "tanh": torch.tanh, "cos": torch.cos, "sin": torch.sin,
    "abs": torch.abs,
}


def _binary(name, fn):
    op = defop(name, "a b", doc=f"Elementwise {name} with numpy broadcasting; both inputs share a dtype.")

    @op.infer
    def _(a, b):
        return TensorType(broadcast(a, b), same_dtype(a, b))

    op.reference(lambda a, b: fn(a, b))


def _compare(name, fn):
    op = defop(name, "a b", doc=f"Elementwise comparison {name} with broadcasting; returns bool.")

    @op.infer
    def _(a, b):
        same_dtype(a, b)
        return TensorType(broadcast(a, b), "bool")

    op.reference(lambda a, b: fn(a, b))


def _unary(name, fn):
    op = defop(name, "x", doc=f"Elementwise {name} of a float tensor.")

    @op.infer
    def _(x):
        if name not in ("neg", "abs"):
            expect_float(x, f"{name} input")
        return x

    op.reference(lambda x: fn(x))


for _n, _f in BINARY.items():
    _binary(_n, _f)
for _n, _f in COMPARE.items():
    _compare(_n, _f)
for _n, _f in UNARY.items():
    _unary(_n, _f)

GELU = defop("gelu", "x", {"approximate": Attr(str, "none", ("none", "tanh"))}, "GELU, exact or tanh.")


@GELU.infer
def _(x, approximate):
    expect_float(x, "gelu input")
    return x


GELU.reference(lambda x, approximate: F.gelu(x, approximate=approximate))

POW = defop("pow", "x", {"exponent": Attr(float)}, "x ** exponent for a constant exponent.")


@POW.infer
def _(x, exponent):
    expect_float(x, "pow input")
    return x


POW.reference(lambda x, exponent: torch.pow(x, exponent))

WHERE = defop("where", "cond a b", doc="cond ? a : b with broadcasting; cond is bool.")


@WHERE.infer
def _(cond, a, b):
    expect(cond.dtype == "bool", f"where: condition must be bool, got {cond}")
    shape = broadcast(TensorType(broadcast(cond, a), a.dtype), b)
    return TensorType(shape, same_dtype(a, b))


WHERE.reference(lambda cond, a, b: torch.where(cond, a, b))

CAST = defop("cast", "x", {"dtype": Attr(str)}, "Convert to another dtype.")


@CAST.infer
def _(x, dtype):
    try:
        return x.with_dtype(dtype_name(dtype))
    except InputError as e:  # a bad attribute is a type-rule failure, so the builder names the node
        raise ShapeError(f"cast: {e}") from None


CAST.reference(lambda x, dtype: x.to(to_torch(dtype)))

CONSTANT = defop("constant", "", {"value": Attr((float, int, tuple)), "shape": Attr(tuple, ()),
                                  "dtype": Attr(str, "float32")},
                 "A literal tensor: a scalar broadcast to `shape`, or a flat tuple of values reshaped to it.")


@CONSTANT.infer
def _(value, shape, dtype):
    expect(all(isinstance(d, int) for d in shape), f"constant shape must be ints, got {shape}")
    if isinstance(value, tuple):
        expect(len(value) == math.prod(shape), f"constant has {len(value)} values for shape {shape}")
    return TensorType(shape, dtype)


@CONSTANT.reference
def _(value, shape, dtype):
    if isinstance(value, tuple):
        return torch.tensor(value, dtype=to_torch(dtype)).reshape(shape)
    return torch.full(shape, value, dtype=to_torch(dtype))


# ---------------------------------------------------------------- linear algebra
LINEAR = defop("linear", "x weight bias?", doc="x @ weight.T (+ bias); weight is [out, in] as in torch and HF.")


@LINEAR.infer
def _(x, w, b=None):
    expect(w.rank == 2, f"linear weight must be [out, in], got {w}")
    expect(x.shape[-1] == w.shape[1], f"linear: input features {x.shape[-1]} != weight in-features {w.shape[1]} "
           f"(x {x}, weight {w})")
    same_dtype(x, w)
    if b is not None:
        expect(b.shape == (w.shape[0],), f"linear bias must be [{w.shape[0]}], got {b}")
    return TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)


@LINEAR.reference
def _(x, w, b=None):
    return F.linear(f32(x), f32(w), None if b is None else f32(b))


MATMUL = defop("matmul", "a b", doc="Batched matrix product a[..., M, K] @ b[..., K, N]; batch dims broadcast.")


@MATMUL.infer
def _(a, b):
    expect(a.rank >= 2 and b.rank >= 2, f"matmul needs rank >= 2, got {a} and {b}")
    expect(a.shape[-1] == b.shape[-2], f"matmul: inner dims differ ({a} @ {b})")
    batch = broadcast(TensorType(a.shape[:-2], a.dtype), TensorType(b.shape[:-2], b.dtype))
    return TensorType(batch + (a.shape[-2], b.shape[-1]), same_dtype(a, b))


MATMUL.reference(lambda a, b: torch.matmul(f32(a), f32(b)))

EINSUM = defop("einsum", "a b", {"equation": Attr(str)},
               "Two-operand einsum, e.g. 'bshd,hdc->bshc' (absorbed MLA uses it).")


@EINSUM.infer
def _(a, b, equation):
    lhs, _, out = equation.replace(" ", "").partition("->")
    ins = lhs.split(",")
    expect(len(ins) == 2 and out, f"einsum equation {equation!r} must be 'xy,yz->xz' with two inputs")
    sizes = {}
    for sub, t in zip(ins, (a, b)):
        expect(len(sub) == t.rank, f"einsum: {sub!r} has {len(sub)} letters for {t}")
        for ch, d in zip(sub, t.shape):
            expect(sizes.setdefault(ch, d) == d, f"einsum: letter {ch!r} is {sizes[ch]} and {d}")
    expect(all(ch in sizes for ch in out), f"einsum: output letters {out!r} not all in inputs")
    return TensorType(tuple(sizes[ch] for ch in out), same_dtype(a, b))


EINSUM.reference(lambda a, b, equation: torch.einsum(equation, f32(a), f32(b)))

# ---------------------------------------------------------------- reductions
SOFTMAX = defop("softmax", "x", {"dim": Attr(int, -1)}, "Softmax along dim, computed in fp32.")


@SOFTMAX.infer
def _(x, dim):
    expect_float(x, "softmax input")
    norm_dim(dim, x.rank)
    return x


SOFTMAX.reference(lambda x, dim: torch.softmax(f32(x), dim))


def _reduce(name, fn):
    op = defop(name, "x", {"dims": Attr(tuple), "keepdim": Attr(bool, False)},
               f"{name} over `dims`.")

    @op.infer
    def _(x, dims, keepdim):
        if name == "mean":
            expect_float(x, "mean input")
        ds = {norm_dim(d, x.rank) for d in dims}
        shape = tuple(1 if i in ds else s for i, s in enumerate(x.shape) if keepdim or i not in ds)
        return TensorType(shape, x.dtype)

    op.reference(lambda x, dims, keepdim: fn(x, dims, keepdim))


_reduce("sum", lambda x, d, k: torch.sum(x, dim=d, keepdim=k))
_reduce("mean", lambda x, d, k: torch.mean(f32(x), dim=d, keepdim=k))
_reduce("amax", lambda x, d, k: torch.amax(x, dim=d, keepdim=k))

ARGMAX = defop("argmax", "x", {"dim": Attr(int, -1), "keepdim": Attr(bool, False)}, "Index of the maximum; int64.")


@ARGMAX.infer
def _(x, dim, keepdim):
    d = norm_dim(dim, x.rank)
    shape = tuple(1 if i == d else s for i, s in enumerate(x.shape) if keepdim or i != d)
    return TensorType(shape, "int64")


ARGMAX.reference(lambda x, dim, keepdim: torch.argmax(x, dim=dim, keepdim=keepdim))

TOPK = defop("topk", "x", {"k": Attr(int), "dim": Attr(int, -1), "largest": Attr(bool, True)},
             "The k largest (or smallest) values, sorted, and their int64 indices.", num_outputs=2)


@TOPK.infer
def _(x, k, dim, largest):
    d = norm_dim(dim, x.rank)
    size = x.shape[d]
    expect(not isinstance(size, int) or 0 < k <= size, f"topk k={k} must be in 1..{size}")
    shape = x.shape[:d] + (k,) + x.shape[d + 1:]
    return TensorType(shape, x.dtype), TensorType(shape, "int64")


@TOPK.reference
def _(x, k, dim, largest):
    r = torch.topk(x, k, dim=dim, largest=largest, sorted=True)
    return r.values, r.indices


# ---------------------------------------------------------------- shape ops
RESHAPE = defop("reshape", "x", {"shape": Attr(tuple)},
                "View with a new shape; dims may be symbols ('B', 'S', 'B*S'); element counts must match.",
                shape_attrs=("shape",))


@RESHAPE.infer
def _(x, shape):
    new = dims(*shape)
    n_old, n_new = 1, 1
    for d in x.shape:
        n_old = n_old * d
    for d in new:
        n_new = n_new * d
    expect(n_old == n_new, f"reshape {x} to {tuple(str(d) for d in new)} changes the element count")
    return TensorType(new, x.dtype)


RESHAPE.reference(lambda x, shape: x.reshape(shape))


PERMUTE = defop("permute", "x", {"dims": Attr(tuple)}, "Reorder dims (torch.permute).")


@PERMUTE.infer
def _(x, dims):
    expect(sorted(norm_dim(d, x.rank) for d in dims) == list(range(x.rank)),
           f"permute dims {dims} is not a permutation of rank {x.rank}")
    return TensorType(tuple(x.shape[d] for d in dims), x.dtype)


PERMUTE.reference(lambda x, dims: x.permute(*dims).contiguous())

EXPAND = defop("expand", "x", {"shape": Attr(tuple)}, "Broadcast size-1 dims to `shape` (symbols allowed).",
               shape_attrs=("shape",))


@EXPAND.infer
def _(x, shape):
    new = dims(*shape)
    expect(len(new) == x.rank, f"expand: rank {x.rank} to {len(new)} dims")
    for a, b in zip(x.shape, new):
        expect(a == b or a == 1, f"expand {x} to {tuple(str(d) for d in new)}")
    return TensorType(new, x.dtype)


EXPAND.reference(lambda x, shape: x.expand(*shape).contiguous())


SPLIT = defop("split", "x", {"sizes": Attr(tuple), "dim": Attr(int, -1)},
              "Split into pieces of the given sizes along dim.", num_outputs=-1, shape_attrs=("sizes",))


@SPLIT.infer
def _(x, sizes, dim):
    d = norm_dim(dim, x.rank)
    total = 0
    for s in sizes:
        total = total + parse_dim(s)
    expect(total == x.shape[d], f"split sizes {sizes} sum to {total}, dim {d} of {x} is {x.shape[d]}")
    return tuple(TensorType(x.shape[:d] + (parse_dim(s),) + x.shape[d + 1:], x.dtype) for s in sizes)


SPLIT.reference(lambda x, sizes, dim: tuple(t.contiguous() for t in torch.split(x, list(sizes), dim=dim)))


SLICE = defop("slice", "x", {"dim": Attr(int), "start": Attr(int), "end": Attr(int, None)},
              "x[start:end] along dim; negative start counts from the end (start=-1 takes the last row).")


@SLICE.infer
def _(x, dim, start, end):
    d = norm_dim(dim, x.rank)
    size = x.shape[d]
    if start < 0 and end is None:
        n = -start
    elif end is None:
        n = size - start
    else:
        expect(start >= 0 and end >= start, f"slice [{start}:{end}] must have 0 <= start <= end")
        n = end - start
    expect(not isinstance(size, int) or n <= size, f"slice takes {n} of {size}")
    return TensorType(x.shape[:d] + (n,) + x.shape[d + 1:], x.dtype)


@SLICE.reference
def _(x, dim, start, end):
    idx = [slice(None)] * x.dim()
    idx[dim] = slice(start, end)
    return x[tuple(idx)].contiguous()


CONCAT = defop("concat", "*xs", {"dim": Attr(int, -1)}, "Concatenate along dim.")


@CONCAT.infer
def _(*xs, dim):
    expect(len(xs) >= 1, "concat needs at least one input")
    d = norm_dim(dim, xs[0].rank)
    total = 0
    for x in xs:
        expect(x.rank == xs[0].rank and x.shape[:d] + x.shape[d + 1:] == xs[0].shape[:d] + xs[0].shape[d + 1:],
               f"concat along {d}: shapes differ off that dim ({', '.join(map(str, xs))})")
        total = total + x.shape[d]
    return TensorType(xs[0].shape[:d] + (total,) + xs[0].shape[d + 1:], same_dtype(*xs))


CONCAT.reference(lambda *xs, dim: torch.cat(xs, dim=dim))

# ---------------------------------------------------------------- indexing
EMBED = defop("embed", "ids weight", doc="Row lookup: weight[ids]; ids int64 of any shape, weight [V, D].")


@EMBED.infer
def _(ids, w):
    expect_int(ids, "embed ids")
    expect(w.rank == 2, f"embed weight must be [vocab, dim], got {w}")
    return TensorType(ids.shape + (w.shape[1],), w.dtype)


EMBED.reference(lambda ids, w: F.embedding(ids, w))

GATHER = defop("gather", "x index", {"dim": Attr(int)}, "torch.gather along dim.")


@GATHER.infer
def _(x, index, dim):
    expect_int(index, "gather index")
    expect(index.rank == x.rank, f"gather: index rank {index.rank} != input rank {x.rank}")
    norm_dim(dim, x.rank)
    return TensorType(index.shape, x.dtype)


GATHER.reference(lambda x, index, dim: torch.gather(x, dim, index))

SCATTER = defop("scatter", "x index src", {"dim": Attr(int)}, "Out-of-place torch.scatter along dim.")


@SCATTER.infer
def _(x, index, src, dim):
    expect_int(index, "scatter index")
    expect(index.shape == src.shape, f"scatter: index {index} and src {src} shapes differ")
    same_dtype(x, src)
    return x


SCATTER.reference(lambda x, index, src, dim: torch.scatter(x, dim, index, src))

INDEX_ADD = defop("index_add", "x index src", {"dim": Attr(int, 0)},
                  "Out-of-place torch.index_add: x[index[i]] += src[i] along dim (index is 1-D).")


@INDEX_ADD.infer
def _(x, index, src, dim):
    expect_int(index, "index_add index")
    expect(index.rank == 1, f"index_add index must be 1-D, got {index}")
    same_dtype(x, src)
    return x


@INDEX_ADD.reference
def _(x, index, src, dim):
    if not x.is_floating_point():  # integer sums stay exact
        return torch.index_add(x, dim, index, src)
    return torch.index_add(f32(x), dim, index, f32(src))


INDEX_SELECT = defop("index_select", "x index", {"dim": Attr(int, 0)}, "torch.index_select with a 1-D index.")


@INDEX_SELECT.infer
def _(x, index, dim):
    expect_int(index, "index_select index")
    expect(index.rank == 1, f"index_select index must be 1-D, got {index}")
    d = norm_dim(dim, x.rank)
    return TensorType(x.shape[:d] + (index.shape[0],) + x.shape[d + 1:], x.dtype)


INDEX_SELECT.reference(lambda x, index, dim: torch.index_select(x, dim, index))

ARANGE_LIKE = defop("arange_like", "x", {"dim": Attr(int)}, "int64 [0, 1, ..., size-1] for x's size along dim.")


@ARANGE_LIKE.infer
def _(x, dim):
    return TensorType((x.shape[norm_dim(dim, x.rank)],), "int64")


ARANGE_LIKE.reference(lambda x, dim: torch.arange(x.shape[dim], device=x.device))

CAUSAL_MASK = defop("causal_mask", "q k", {"q_dim": Attr(int, 1), "k_dim": Attr(int, 1)},
                    "bool [Sq, Sk]: query i (at absolute position Sk-Sq+i) may see keys 0..Sk-Sq+i.")


@CAUSAL_MASK.infer
def _(q, k, q_dim, k_dim):
    return TensorType((q.shape[norm_dim(q_dim, q.rank)], k.shape[norm_dim(k_dim, k.rank)]), "bool")


@CAUSAL_MASK.reference
def _(q, k, q_dim, k_dim):
    sq, sk = q.shape[q_dim], k.shape[k_dim]
    qi = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    return torch.arange(sk, device=q.device)[None, :] <= qi
