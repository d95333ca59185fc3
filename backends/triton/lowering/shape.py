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
from .. import decode_graphs, paged_decode
from .registry import TABLE, Lowered


def _dims(spec, sym):
    return tuple(eval_dim(parse_dim(d), sym) for d in spec)


def _lib(node, fn, call: str) -> Lowered:
    return Lowered("library", call, fn=fn)


@TABLE.register("reshape")
def _(ctx, node):
    shape = node.attrs["shape"]
    return _lib(node, lambda a, sym: [a[0].reshape(_dims(shape, sym))], "torch.reshape (view when possible)")


@TABLE.register("expand")
def _(ctx, node):
    shape = node.attrs["shape"]
    return _lib(node, lambda a, sym: [a[0].expand(*_dims(shape, sym))], "torch.expand (view)")


@TABLE.register("permute")
def _(ctx, node):
    dims = node.attrs["dims"]
    return _lib(node, lambda a, sym: [a[0].permute(*dims)], "torch.permute (view)")


@TABLE.register("split")
def _(ctx, node):
    sizes, dim = node.attrs["sizes"], node.attrs["dim"]
    return _lib(node, lambda a, sym: list(torch.split(a[0], list(_dims(sizes, sym)), dim=dim)), "torch.split (views)")


@TABLE.register("slice")
def _(ctx, node):
    dim, start, end = node.attrs["dim"], node.attrs["start"], node.attrs["end"]

    def run(a, sym):
        idx = [slice(None)] * a[0].dim()
        idx[dim] = slice(start, end)
        return [a[0][tuple(idx)]]
    return _lib(node, run, "tensor slicing (view)")


@TABLE.register("concat")
def _(ctx, node):
    dim = node.attrs["dim"]
    return _lib(node, lambda a, sym: [torch.cat(a, dim=dim)], "torch.cat")


@TABLE.register("cache.append")
def _(ctx, node):
    if ctx.paged is not None:  # the paged decode program: write each row's entry at its pool slot
        pool = ctx.paged.value(node.inputs[0])
        return Lowered("library", "paged_decode.append_paged (index_copy_ of the new rows at their pool slots)",
                       inputs=(pool, node.inputs[1], ctx.paged.inputs["cache_slots"]),
                       outputs=(ctx.paged.value(node.outputs[0]),),
                       fn=lambda a, sym: [paged_decode.append_paged(a[0], a[1], a[2])])

    dim = node.inputs[0].type.shape[1]   # T, or a compact cache's T//m: its row is the device-side T's

    def run(a, sym):  # a[2]: the device-side rows of a static-capacity decode step, else None
        if a[2] is None:
            return [kv_cache.append(a[0], a[1])]
        return [decode_graphs.append_static(a[0], a[1], a[2] if str(dim) == "T" else eval_dim(dim, {"T": a[2]}))]
    return Lowered("library", "kv_cache.append (in place into spare capacity; torch copy into a new buffer when full; "
                   "index_copy_ at the device-side length in CUDA-graph decode)",
                   inputs=(*node.inputs, ctx.lengths["cache_rows"]), fn=run)


@TABLE.register("embed")
def _(ctx, node):
    return _lib(node, lambda a, sym: [F.embedding(a[0], a[1])], "torch.nn.functional.embedding")


@TABLE.register("gather")
def _(ctx, node):
    dim = node.attrs["dim"]
    return _lib(node, lambda a, sym: [torch.gather(a[0], dim, a[1])], "torch.gather")


@TABLE.register("index_select")
def _(ctx, node):
    dim = node.attrs["dim"]
    return _lib(node, lambda a, sym: [torch.index_select(a[0], dim, a[1])], "torch.index_select")


@TABLE.register("scatter")
def _(ctx, node):
    dim = node.attrs["dim"]
    return _lib(node, lambda a, sym: [torch.scatter(a[0], dim, a[1], a[2])], "torch.scatter")


@TABLE.register("index_add")
def _(ctx, node):
    dim, dt = node.attrs["dim"], to_torch(node.outputs[0].dtype)
    return _lib(node, lambda a, sym: [torch.index_add(a[0].float(), dim, a[1], a[2].float()).to(dt)],
                "torch.index_add (fp32 accumulation)")


@TABLE.register("arange_like")
def _(ctx, node):
    dim = node.attrs["dim"]
    return _lib(node, lambda a, sym: [torch.arange(a[0].shape[dim], device=a[0].device)], "torch.arange")


@TABLE.register("causal_mask")
def _(ctx, node):
    qd, kd = node.attrs["q_dim"], node.attrs["k_dim"]

    def run(a, sym):
        sq, sk = a[0].shape[qd], a[1].shape[kd]
        qi = torch.arange(sq, device=a[0].device)[:, None] + (sk - sq)
        return [torch.arange(sk, device=a[0].device)[None, :] <= qi]
    return _lib(node, run, "torch.arange comparison")


@TABLE.register("softmax")
def _(ctx, node):
    dim, dt = node.attrs["dim"], to_torch(node.outputs[0].dtype)
    return _lib(node, lambda a, sym: [torch.softmax(a[0].float(), dim).to(dt)], "torch.softmax (fp32)")


def _reduction(op, fn):
    @TABLE.register(op)
    def _(ctx, node):
        dims, keep, dt = node.attrs["dims"], node.attrs["keepdim"], to_torch(node.outputs[0].dtype)
        return _lib(node, lambda a, sym: [fn(a[0], dim=dims, keepdim=keep).to(dt)], f"torch.{op}")


_reduction("sum", torch.sum)
_reduction("mean", lambda x, dim, keepdim: torch.mean(x.float(), dim=dim, keepdim=keepdim))
_reduction("amax", torch.amax)


@TABLE.register("argmax")
def _(ctx, node):
    dim, keep = node.attrs["dim"], node.attrs["keepdim"]
    return _lib(node, lambda a, sym: [torch.argmax(a[0], dim=dim, keepdim=keep)], "torch.argmax")


@TABLE.register("topk")
def _(ctx, node):
    k, dim, largest = node.attrs["k"], node.attrs["dim"], node.attrs["largest"]
    return _lib(node, lambda a, sym: list(torch.topk(a[0], k, dim=dim, largest=largest, sorted=True)), "torch.topk")


@TABLE.register("where")
def _(ctx, node):
    return _lib(node, lambda a, sym: [torch.where(a[0], a[1], a[2])], "torch.where")


for _name, _fn in {"eq": torch.eq, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge}.items():
    def _make(fn, name):
        @TABLE.register(name)
        def _(ctx, node):
            return _lib(node, lambda a, sym: [fn(a[0], a[1])], f"torch.{name}")
    _make(_fn, _name)
