"""Data movement and small reductions as named torch library calls (views where possible, no copies).

These ops move or index data rather than compute on it (reshape/split are views, concat one copy, cache.append a
write of the new rows into spare capacity: backends/kv_cache.py), so a generated kernel would only add a launch;
each is recorded as a `library` choice naming the call. Reductions with their own semantics (softmax, topk,
argmax, ...) go to torch too, named the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsgraph.dtypes import to_torch
from dsgraph.symbolic import eval_dim, parse_dim

from ... import kv_cache
from .. import decode_graphs
from .registry import Lowered, lowering


def _dims(spec, sym):
    return tuple(eval_dim(parse_dim(d), sym) for d in spec)


def _lib(node, fn, call: str) -> Lowered:
    return Lowered(fn, "library", call)


@lowering("reshape")
def _(node, ctx):
    shape = node.attrs["shape"]
    return _lib(node, lambda a, sym: [a[0].reshape(_dims(shape, sym))], "torch.reshape (view when possible)")


@lowering("expand")
def _(node, ctx):
    shape = node.attrs["shape"]
    return _lib(node, lambda a, sym: [a[0].expand(*_dims(shape, sym))], "torch.expand (view)")


@lowering("permute")
def _(node, ctx):
    dims = node.attrs["dims"]
    return _lib(node, lambda a, sym: [a[0].permute(*dims)], "torch.permute (view)")


@lowering("split")
def _(node, ctx):
    sizes, dim = node.attrs["sizes"], node.attrs["dim"]
    return _lib(node, lambda a, sym: list(torch.split(a[0], list(_dims(sizes, sym)), dim=dim)), "torch.split (views)")


@lowering("slice")
def _(node, ctx):
    dim, start, end = node.attrs["dim"], node.attrs["start"], node.attrs["end"]

    def run(a, sym):
        idx = [slice(None)] * a[0].dim()
        idx[dim] = slice(start, end)
        return [a[0][tuple(idx)]]
    return _lib(node, run, "tensor slicing (view)")


@lowering("concat")
def _(node, ctx):
    dim = node.attrs["dim"]
    return _lib(node, lambda a, sym: [torch.cat(a, dim=dim)], "torch.cat")


@lowering("cache.append")
def _(node, ctx):
    def run(a, sym):
        static = decode_graphs.active()
        return [kv_cache.append(a[0], a[1]) if static is None else decode_graphs.append_static(a[0], a[1], static)]
    return _lib(node, run, "kv_cache.append (in place into spare capacity; torch copy into a new buffer when full; "
                "index_copy_ at the device-side length in CUDA-graph decode)")


@lowering("embed")
def _(node, ctx):
    return _lib(node, lambda a, sym: [F.embedding(a[0], a[1])], "torch.nn.functional.embedding")


@lowering("gather")
def _(node, ctx):
    dim = node.attrs["dim"]
    return _lib(node, lambda a, sym: [torch.gather(a[0], dim, a[1])], "torch.gather")


@lowering("index_select")
def _(node, ctx):
    dim = node.attrs["dim"]
    return _lib(node, lambda a, sym: [torch.index_select(a[0], dim, a[1])], "torch.index_select")


@lowering("scatter")
def _(node, ctx):
    dim = node.attrs["dim"]
    return _lib(node, lambda a, sym: [torch.scatter(a[0], dim, a[1], a[2])], "torch.scatter")


@lowering("index_add")
def _(node, ctx):
    dim, dt = node.attrs["dim"], to_torch(node.outputs[0].dtype)
    return _lib(node, lambda a, sym: [torch.index_add(a[0].float(), dim, a[1], a[2].float()).to(dt)],
                "torch.index_add (fp32 accumulation)")


@lowering("arange_like")
def _(node, ctx):
    dim = node.attrs["dim"]
    return _lib(node, lambda a, sym: [torch.arange(a[0].shape[dim], device=a[0].device)], "torch.arange")


@lowering("causal_mask")
def _(node, ctx):
    qd, kd = node.attrs["q_dim"], node.attrs["k_dim"]

    def run(a, sym):
        sq, sk = a[0].shape[qd], a[1].shape[kd]
        qi = torch.arange(sq, device=a[0].device)[:, None] + (sk - sq)
        return [torch.arange(sk, device=a[0].device)[None, :] <= qi]
    return _lib(node, run, "torch.arange comparison")


@lowering("softmax")
def _(node, ctx):
    dim, dt = node.attrs["dim"], to_torch(node.outputs[0].dtype)
    return _lib(node, lambda a, sym: [torch.softmax(a[0].float(), dim).to(dt)], "torch.softmax (fp32)")


def _reduction(op, fn):
    @lowering(op)
    def _(node, ctx):
        dims, keep, dt = node.attrs["dims"], node.attrs["keepdim"], to_torch(node.outputs[0].dtype)
        return _lib(node, lambda a, sym: [fn(a[0], dim=dims, keepdim=keep).to(dt)], f"torch.{op}")


_reduction("sum", torch.sum)
_reduction("mean", lambda x, dim, keepdim: torch.mean(x.float(), dim=dim, keepdim=keepdim))
_reduction("amax", torch.amax)


@lowering("argmax")
def _(node, ctx):
    dim, keep = node.attrs["dim"], node.attrs["keepdim"]
    return _lib(node, lambda a, sym: [torch.argmax(a[0], dim=dim, keepdim=keep)], "torch.argmax")


@lowering("topk")
def _(node, ctx):
    k, dim, largest = node.attrs["k"], node.attrs["dim"], node.attrs["largest"]
    return _lib(node, lambda a, sym: list(torch.topk(a[0], k, dim=dim, largest=largest, sorted=True)), "torch.topk")


@lowering("where")
def _(node, ctx):
    return _lib(node, lambda a, sym: [torch.where(a[0], a[1], a[2])], "torch.where")


for _name, _fn in {"eq": torch.eq, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge}.items():
    def _make(fn, name):
        @lowering(name)
        def _(node, ctx):
            return _lib(node, lambda a, sym: [fn(a[0], a[1])], f"torch.{name}")
    _make(_fn, _name)
