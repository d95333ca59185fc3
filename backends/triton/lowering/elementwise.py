"""Fused elementwise chains: grow a region from an elementwise node along its users, then generate one kernel.

A node joins when it is elementwise over floats (or exact integer arithmetic over one int dtype: positions), its
output has the region's iteration shape, each external input is full-shape, a static broadcast suffix, a row
broadcast (a [.., 1] keepdim reduction against [.., N]) or a scalar, and claiming it keeps the program valid
(`LowerCtx.region_ok`). Scalar `constant`s are inlined as literals. See codegen/elementwise.py for numerics.
"""
from __future__ import annotations

import math

from dsgraph.backends.lowering import Decline

from dsgraph.symbolic import eval_dim

from ..codegen.elementwise import (
    EXPRESSIONS,
    INT_DTYPES,
    INT_OPS,
    POW_EXPRESSIONS,
    EwInput,
    EwOp,
    fused_elementwise,
)
from .registry import TABLE, Lowered, Region

_FLOATS = ("float32", "float16", "bfloat16")


def _literal(v) -> str | None:
    """A finite scalar constant's Python literal, or None."""
    n = v.node
    if n is None or n.op != "constant" or n.attrs["shape"] != () or isinstance(n.attrs["value"], tuple):
        return None
    if v.dtype in INT_DTYPES:
        return repr(int(n.attrs["value"]))
    value = float(n.attrs["value"])
    return repr(value) if math.isfinite(value) else None


def _input_mode(v, shape) -> tuple[str, int] | None:
    if v.shape == shape:
        return "full", 0
    dims = list(v.shape)
    while dims and dims[0] == 1:
        dims.pop(0)
    if not all(isinstance(d, int) for d in dims):
        return _rows(v.shape, shape)
    numel = math.prod(dims)
    if numel == 1:
        return "scalar", 1
    if len(dims) <= len(shape) and tuple(dims) == tuple(shape[len(shape) - len(dims):]):
        return "suffix", numel
    return _rows(v.shape, shape)


def _rows(vshape, shape) -> tuple[str, int] | None:
    """("rows", run) for vshape = shape[:k] + (1,) * (r - k), 0 < k < r, with a static run = prod(shape[k:])."""
    k = len(vshape)
    while k and vshape[k - 1] == 1:
        k -= 1
    run = shape[k:]
    if len(vshape) != len(shape) or not 0 < k < len(shape) or tuple(vshape[:k]) != tuple(shape[:k]) \
            or not all(isinstance(d, int) for d in run):
        return None
    return "rows", math.prod(run)


def _fusable(node, shape) -> bool:
    op = node.op
    if op not in EXPRESSIONS and op not in ("pow", "gelu"):
        return False
    if op == "pow" and node.attrs["exponent"] not in POW_EXPRESSIONS:
        return False
    out = node.outputs[0]
    if out.shape != shape:
        return False
    if out.dtype in INT_DTYPES:  # integer arithmetic on index values (positions), inputs of the same dtype
        ok_in = lambda v: op in INT_OPS and v.dtype == out.dtype  # noqa: E731
    elif out.dtype in _FLOATS:
        ok_in = lambda v: v.dtype != "bool" and (op == "cast" or v.dtype in _FLOATS)  # noqa: E731
    else:
        return False
    for v in node.inputs:
        if not ok_in(v):
            return False
        if _literal(v) is None and _input_mode(v, shape) is None:
            return False
    return True


def grow(node, ctx) -> list:
    shape = node.outputs[0].shape
    region = [node]
    changed = True
    while changed:
        changed = False
        members = {id(n) for n in region}
        for v in [v for n in region for v in n.outputs]:
            for u in ctx.users(v):
                if id(u) in members or not ctx.free(u) or not _fusable(u, shape):
                    continue
                if ctx.region_ok(region + [u]):
                    region.append(u)
                    members.add(id(u))
                    changed = True
    return sorted(region, key=lambda n: ctx.index[id(n)])


@TABLE.register(*EXPRESSIONS, "pow", "gelu")
def _(ctx, node):
    shape = node.outputs[0].shape
    if not _fusable(node, shape):
        return Decline("not a float (or same-dtype integer add/sub/mul/neg/...) elementwise node over full-shape, "
                       "suffix-broadcast, row-broadcast or scalar inputs")
    nodes = grow(node, ctx)
    names: dict[int, str] = {}
    inputs, ext = [], []
    for v in Region(nodes).external_inputs():
        lit = _literal(v)
        if lit is not None:
            names[id(v)] = lit
            continue
        mode, numel = _input_mode(v, shape)
        names[id(v)] = f"in{len(inputs)}"
        inputs.append(EwInput(names[id(v)], v.dtype, mode, numel, f"%{v.name}: {v.type}"))
        ext.append(v)
    ops = []
    for i, n in enumerate(nodes):
        names[id(n.outputs[0])] = f"v{i}"
        ops.append(EwOp(f"v{i}", n.op, tuple(names[id(v)] for v in n.inputs), n.outputs[0].dtype, n.format(4),
                        n.attrs.get("exponent"), n.attrs.get("approximate")))
    outputs = ctx.region_outputs(nodes)
    title = f"fused elementwise chain of {len(nodes)} node(s) over {'x'.join(str(d) for d in shape) or 'scalar'}"
    name = "ew_" + "_".join(dict.fromkeys(n.op for n in nodes))[:40]
    src = ctx.generated(fused_elementwise(name, inputs, ops, [(names[id(v)], v.dtype) for v in outputs], title),
                        *nodes)
    return Lowered("generated", src.name, nodes=tuple(nodes), inputs=tuple(ext), outputs=outputs,
                   fn=lambda args, sym: src(tuple(eval_dim(d, sym) for d in shape), *args))
