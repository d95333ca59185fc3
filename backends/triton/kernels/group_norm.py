"""GroupNorm (op `norm.group`, the Janus VQ decoder's normalisation): x [N, C, ...] with C in `groups` groups;
each group's C/groups channels x spatial elements are contiguous in a contiguous x, so one program owns one
(image, group) and reads it as a flat run.

Three passes over the run in BLOCK chunks: the mean, the variance of the centred values (two passes, not
E[x^2] - E[x]^2, whose cancellation loses digits on the decoder's large activations), then the normalised values
times each element's channel weight plus bias. Statistics and arithmetic in fp32; the output in x's dtype.
N * groups programs (32 per image in the VQ decoder) is below an H200's SM count; a split reduction would fill
it, and is the next step if the decoder's norms show in its profile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsgraph.errors import ShapeError

from .flash_attention import check_tensors


@triton.jit
def _group_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, GROUPS, CPG, INNER, eps, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    size = CPG * INNER   # the group's elements: CPG channels of INNER spatial positions
    base = pid * size
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, size, BLOCK):
        ok = i0 + offs < size
        total += tl.load(x_ptr + base + i0 + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(total, 0) / size
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, size, BLOCK):
        ok = i0 + offs < size
        c = tl.load(x_ptr + base + i0 + offs, mask=ok, other=0.0).to(tl.float32) - mean
        sq += tl.where(ok, c * c, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(sq, 0) / size + eps)
    first = (pid % GROUPS) * CPG   # the group's first channel
    for i0 in range(0, size, BLOCK):
        ok = i0 + offs < size
        ch = first + (i0 + offs) // INNER
        x = tl.load(x_ptr + base + i0 + offs, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ch, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + ch, mask=ok, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + b
        tl.store(y_ptr + base + i0 + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """`norm.group` semantics: F.group_norm with fp32 statistics; returns x's shape and dtype."""
    check_tensors("group_norm", dots=False, x=x, weight=weight, bias=bias)
    c = x.shape[1] if x.dim() >= 2 else 0
    if not c or groups <= 0 or c % groups or weight.shape != (c,) or bias.shape != (c,):
        raise ShapeError(f"group_norm: x {tuple(x.shape)} must be [N, C, ...] with C divisible by {groups} groups "
                         f"and weight / bias [C], got {tuple(weight.shape)} / {tuple(bias.shape)}")
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    inner = x[0, 0].numel()
    cpg = c // groups
    block = min(4096, triton.next_power_of_2(cpg * inner))
    _group_norm_kernel[(x.shape[0] * groups,)](x, weight.contiguous(), bias.contiguous(), y, groups, cpg, inner,
                                                eps, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return y
