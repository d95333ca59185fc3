"""Weight transforms that travel with a rewrite.

A weight the graph reads is either a param or, for FP8 checkpoints,
`[cast](dequant_fp8(w_e4m3, scale_inv))`. `weight_ref` sees through that form (the one
recogniser: passes and backends alike use it); `mxfp4_ref` sees through V4's
`dequant_mxfp4(w_e2m1, e8m0)` experts, for the code that keeps them MXFP4; `new_param` adds a param whose tensor
is derived lazily (WeightStore.derive) from other weights, so the same pass works on
a tiny random model and on a full checkpoint that was never materialised. Passes that
fold weights into each other (absorption) use `dense_param` (dequantising FP8); passes
that only concatenate or stack rows keep FP8 when the row blocks line up (`stack_rows`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dsgraph.dtypes import to_torch
from dsgraph.ir import Node, Value
from dsgraph.ops.mlp import dequant_fp8_block
from dsgraph.ops.v4_mix import MXFP4_BLOCK, dequant_mxfp4_ref
from dsgraph.rewriter import RewriteBuilder
from dsgraph.types import TensorType
from dsgraph.weights import WeightStore


@dataclass(frozen=True)
class WeightRef:
    """Where a weight value comes from: a dense param `w`, an FP8 param `w` with block scales `s`, or (fmt
    "mxfp4") packed e2m1 `w` with per-32 e8m0 scales `s`."""

    value: Value
    w: Value
    s: Value | None = None
    block: tuple[int, int] | None = None
    fmt: str = "fp8"

    @property
    def param(self) -> str:
        return self.w.name

    @property
    def scale(self) -> str | None:
        return None if self.s is None else self.s.name

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.param,) if self.scale is None else (self.param, self.scale)

    @property
    def base(self) -> str:
        """The checkpoint prefix, e.g. 'model.layers.0.self_attn.kv_b_proj'."""
        return self.param[: -len(".weight")] if self.param.endswith(".weight") else self.param

    @property
    def dequant(self) -> Node | None:
        """The dequant_fp8 node of an FP8 weight (under the cast, if there is one)."""
        if self.s is None:
            return None
        node = self.value.node
        return node if node.op in ("dequant_fp8", "dequant_mxfp4") else node.inputs[0].node


def weight_ref(v: Value) -> WeightRef | None:
    """The one recogniser of weights, for passes and backends: a param, or [cast](dequant_fp8(param, param));
    None for anything computed otherwise."""
    if v.kind == "param":
        return WeightRef(v, v)
    node = v.node
    if node is not None and node.op == "cast" and node.inputs[0].node is not None:
        inner = node.inputs[0].node
        if inner.op == "dequant_fp8":
            node = inner
    if node is not None and node.op == "dequant_fp8" and all(i.kind == "param" for i in node.inputs):
        return WeightRef(v, node.inputs[0], node.inputs[1], tuple(node.attrs["block"]))
    return None


def mxfp4_ref(v: Value) -> WeightRef | None:
    """v = dequant_mxfp4(param, param) as a WeightRef (fmt "mxfp4"), else None."""
    node = v.node
    if node is not None and node.op == "dequant_mxfp4" and all(i.kind == "param" for i in node.inputs):
        return WeightRef(v, node.inputs[0], node.inputs[1], fmt="mxfp4")
    return None


def dense(ref: WeightRef, w: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 tensor a WeightRef stands for, given its source tensors."""
    if s is None:
        return w.float()
    return dequant_mxfp4_ref(w, s) if ref.fmt == "mxfp4" else dequant_fp8_block(w, s, ref.block)


def new_param(b: RewriteBuilder, weights: WeightStore, name: str, type: TensorType,
              fn: Callable[..., torch.Tensor], *sources: str) -> Value:
    """Add param `name` of `type` (through the rewrite's builder), its tensor fn(*weights[sources]) cast to
    type.dtype, computed lazily."""
    dt = to_torch(type.dtype)
    if name in b.graph.inputs:
        return b.graph.inputs[name]

    def make(*ts):
        return fn(*ts).to(dt).contiguous()

    if all(s in weights for s in sources):
        weights.derive(name, make, *sources)
    else:  # a graph without weights (e.g. a full-size preset being shown): fail only when materialised
        weights.set(name, lambda: make(*(weights[s] for s in sources)))
    return b.add_input(name, type, "param")


def dense_param(b: RewriteBuilder, weights: WeightStore, name: str, shape, dtype: str,
                fn: Callable[..., torch.Tensor], *refs: WeightRef) -> Value:
    """A param computed by fn(*dense fp32 tensors of refs) — FP8 refs are dequantised first."""
    sources = [s for r in refs for s in r.sources]

    def combined(*ts):
        it = iter(ts)
        return fn(*(dense(r, *(next(it) for _ in r.sources)) for r in refs))

    return new_param(b, weights, name, TensorType(tuple(shape), dtype), combined, *sources)


def stack_rows(b: RewriteBuilder, weights: WeightStore, name: str, refs: list[WeightRef], dtype: str) -> Value:
    """Rows of every ref concatenated: [sum N_i, K] in `dtype`. MXFP4 stays MXFP4 (its scales are per row);
    FP8 stays FP8 when every N_i but the last is a multiple of the block height (the scales then concatenate
    too; the last block may be partial); otherwise the result is a dense (dequantised) param."""
    ks = {r.value.type.shape[1] for r in refs}
    rows = sum(r.value.type.shape[0] for r in refs)
    assert len(ks) == 1, f"stack_rows: widths differ {ks}"
    k = ks.pop()
    if all(r.fmt == "mxfp4" for r in refs):
        w = new_param(b, weights, f"{name}.weight", TensorType((rows, k // 2), refs[0].w.dtype),
                      lambda *ts: torch.cat(ts), *(r.param for r in refs))
        s = new_param(b, weights, f"{name}.scale", TensorType((rows, k // MXFP4_BLOCK), "uint8"),
                      lambda *ts: torch.cat(ts), *(r.scale for r in refs))
        return b.dequant_mxfp4(w, s, dtype=dtype)
    blocks = {r.block for r in refs}
    if None not in blocks and len(blocks) == 1 and all(r.value.type.shape[0] % r.block[0] == 0 for r in refs[:-1]):
        block = refs[0].block
        w = new_param(b, weights, f"{name}.weight", TensorType((rows, k), "float8_e4m3fn"),
                      lambda *ts: torch.cat([t.view(torch.uint8) for t in ts]).view(torch.float8_e4m3fn),
                      *(r.param for r in refs))
        s_shape = (-(-rows // block[0]), -(-k // block[1]))
        s = new_param(b, weights, f"{name}.weight_scale_inv", TensorType(s_shape, "float32"),
                      lambda *ts: torch.cat(ts), *(r.scale for r in refs))
        out = b.dequant_fp8(w, s, block=block)
        return out if dtype == "float32" else b.cast(out, dtype=dtype)
    return dense_param(b, weights, f"{name}.weight", (rows, k), dtype, lambda *ts: torch.cat(ts), *refs)
