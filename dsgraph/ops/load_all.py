"""Importing this module registers every op (primitive first, then domain ops)."""
from . import attention, mlp, moe, norm, primitive, rope  # noqa: F401
