"""Collectives: torch.distributed on the default process group (NCCL on GPUs, gloo on CPUs) — a `library`
choice; a faster all-to-all kernel (DeepEP-style) would be a lowering registered here ahead of it."""
from __future__ import annotations

from dsgraph.interpreter import reference_fn
from dsgraph.ops.dist import COLLECTIVES

from .registry import TABLE, Lowered


def _collective(ctx, node):
    return Lowered("library", f"torch.distributed {node.op.removeprefix('dist.')} (the op's reference)",
                   fn=reference_fn(node))


for _op in COLLECTIVES:
    TABLE.register(_op)(_collective)
