"""One PrimFunc out of several schedules of it, chosen at run time by a condition on a symbolic extent.

The variants are schedules of the same function (same parameters); their root blocks' allocations are merged
(one definition per buffer: variants that keep the same intermediate share it) and their bodies nested in
if/else on `tvm_thread_invariant` conditions, which TVM hoists out of the kernels (one kernel per branch).
"""
from __future__ import annotations

from .deps import s_tir, tirx


def join(func, branches, default):
    """`branches`: [(condition, scheduled func)] tried in order; `default`: the scheduled func otherwise."""
    allocs = []
    for f in [*(f for _, f in branches), default]:
        allocs += [buf for buf in f.body.block.alloc_buffers if not any(buf.same_as(b) for b in allocs)]
    body = default.body.block.body
    for cond, f in reversed(branches):
        body = tirx.IfThenElse(tirx.op.tvm_thread_invariant(cond), f.body.block.body, body)
    root = s_tir.SBlock([], [], [], "root", body, alloc_buffers=allocs)
    return func.with_body(s_tir.SBlockRealize([], True, root)).with_attr("tirx.HoistIfThenElseExprWithBlock", 1)
