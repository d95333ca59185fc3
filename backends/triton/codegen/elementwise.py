"""Generated fused elementwise chains (casts, scaling, add/mul/silu chains, ...) over one iteration shape.

A chain is a set of elementwise nodes whose outputs all have the iteration shape; its external inputs either
have that shape (loaded at the flat offset), are a broadcast suffix of it (a bias [N] against [.., N]: loaded at
offset % numel) or are scalars. Each float node computes in fp32 and rounds to its declared dtype, exactly as the
eager reference does op by op, so fusion changes no result bit on fp32 and only saves memory traffic; integer
add/sub/mul/neg/... (positions) compute in their own dtype, exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from .source import TRITON_DTYPES, KernelSource

# op -> expression over fp32 operands a, b (`{a}`, `{b}`)
EXPRESSIONS = {
    "add": "{a} + {b}", "sub": "{a} - {b}", "mul": "{a} * {b}", "div": "{a} / {b}",
    "maximum": "tl.maximum({a}, {b})", "minimum": "tl.minimum({a}, {b})",
    "neg": "-{a}", "exp": "tl.exp({a})", "log": "tl.log({a})", "sqrt": "tl.sqrt({a})", "rsqrt": "tl.rsqrt({a})",
    "sigmoid": "tl.sigmoid({a})", "silu": "{a} / (1.0 + tl.exp(-{a}))", "tanh": "2.0 * tl.sigmoid(2.0 * {a}) - 1.0",
    "cos": "tl.cos({a})", "sin": "tl.sin({a})", "abs": "tl.abs({a})", "cast": "{a}",
}
INT_OPS = ("add", "sub", "mul", "maximum", "minimum", "neg", "abs")  # exact on integers (torch's int64 wrapping)
INT_DTYPES = ("int64", "int32")
POW_EXPRESSIONS = {2.0: "{a} * {a}", 3.0: "{a} * {a} * {a}", 0.5: "tl.sqrt({a})", -0.5: "tl.rsqrt({a})",
                   1.0: "{a}", -1.0: "1.0 / {a}"}
GELU_EXPRESSIONS = {   # by `approximate`: torch's exact (erf) form; the tanh form 0.5x(1 + tanh y) as x * sigmoid(2y)
    "none": "0.5 * {a} * (1.0 + tl.erf({a} * 0.7071067811865476))",
    "tanh": "{a} * tl.sigmoid(1.5957691216057308 * ({a} + 0.044715 * {a} * {a} * {a}))",
}


@dataclass
class EwInput:
    """An external input: `mode` is "full", "suffix" (broadcast of the last `numel` elements), "rows" (one value
    per run of `numel` elements: a [.., 1] keepdim reduction against [.., N]) or "scalar"."""

    var: str
    dtype: str
    mode: str
    numel: int = 1
    label: str = ""


@dataclass
class EwOp:
    """One node: `out = op(args)` with args naming earlier vars or holding literals."""

    out: str
    op: str
    args: tuple[str, ...]
    dtype: str
    label: str
    exponent: float | None = None   # pow's
    approximate: str | None = None   # gelu's


def expression(op: EwOp) -> str:
    """Float ops compute in fp32; integer ops (INT_OPS on INT_DTYPES) in their own dtype, exactly."""
    if op.op == "pow":
        template = POW_EXPRESSIONS[op.exponent]
    elif op.op == "gelu":
        template = GELU_EXPRESSIONS[op.approximate]
    else:
        template = EXPRESSIONS[op.op]
    tdt = TRITON_DTYPES[op.dtype]
    inner = tdt if op.dtype in INT_DTYPES else "tl.float32"
    a, b = (f"{arg}.to({inner})" if not _is_literal(arg) else arg for arg in (*op.args, "")[:2])
    return f"({template.format(a=a, b=b)}).to({tdt})"


def _is_literal(arg: str) -> bool:
    return not arg.isidentifier()


def fused_elementwise(name: str, inputs: list[EwInput], ops: list[EwOp], outputs: list[tuple[str, str]],
                      title: str) -> KernelSource:
    """launch(shape, *inputs) -> tuple of outputs (in `outputs` order: (var, dtype)), each of `shape`."""
    params = [f"{i.var}_ptr" for i in inputs] + [f"{o}_out" for o, _ in outputs]
    lines = ["    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)", "    mask = offs < numel"]
    for i in inputs:
        where = {"full": "offs", "suffix": f"offs % {i.numel}", "rows": f"offs // {i.numel}", "scalar": "0"}[i.mode]
        load = f"tl.load({i.var}_ptr + {where}, mask=mask)" if i.mode != "scalar" else f"tl.load({i.var}_ptr)"
        lines.append(f"    {i.var} = {load}  # {i.label}")
    for op in ops:
        lines.append(f"    # {op.label}")
        lines.append(f"    {op.out} = {expression(op)}")
    for var, _ in outputs:
        lines.append(f"    tl.store({var}_out + offs, {var}, mask=mask)")
    torch_dtypes = ", ".join(f"torch.{d}" for _, d in outputs)
    args = ", ".join(i.var for i in inputs)
    body = f'''
import torch

_OUT_DTYPES = ({torch_dtypes},)


@triton.jit
def _kernel({", ".join(params)}, numel, BLOCK: tl.constexpr):
{chr(10).join(lines)}


def launch(shape, {args}):
    ins = [t if t.is_contiguous() else t.contiguous() for t in ({args},)]
    device = ins[0].device
    outs = [torch.empty(shape, dtype=dt, device=device) for dt in _OUT_DTYPES]
    numel = outs[0].numel()
    if numel:
        block = 1024 if numel >= 1024 else triton.next_power_of_2(numel)
        _kernel[(triton.cdiv(numel, block),)](*ins, *outs, numel, BLOCK=block, num_warps=4 if block >= 512 else 1)
    return outs
'''
    return KernelSource(name, title, body)
