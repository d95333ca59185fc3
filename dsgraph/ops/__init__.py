"""The op registry and every op module; `dsgraph.ops.get_op(name)` finds an op.

Importing the package registers every op (primitives first, then the domain ops)."""
from . import (  # noqa: F401
    attention,
    counting,
    dist,
    dsa,
    kvquant,
    mla_fused,
    mlp,
    moe,
    norm,
    primitive,  # noqa: F401  (first: domain ops decompose into primitives)
    rope,
    v4_attn,
    v4_lower,
    v4_mix,
    vision,
)
from .registry import Attr, OpDef, all_ops, defop, expect, get_op, scratch_ops  # noqa: F401
