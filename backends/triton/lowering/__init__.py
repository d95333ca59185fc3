"""Lowerings, one module per op family; importing this package registers them all."""
from . import attention, dist, dsa, elementwise, fp8, linear, mla_rows, moe, norm, shape, v4, vision  # noqa: F401
