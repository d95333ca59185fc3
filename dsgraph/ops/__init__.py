"""The op registry and every op module; `dsgraph.ops.get_op(name)` finds an op."""
from .registry import Attr, OpDef, all_ops, defop, expect, get_op, scratch_ops  # noqa: F401
