"""Importing this module registers every op (primitive first, then domain ops)."""
from . import attention, counting, mlp, moe, norm, primitive, rope  # noqa: F401
