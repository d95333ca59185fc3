"""Lowerings, one module per op family; importing this package registers them all."""
from . import (  # noqa: F401
    attention,
    dist,
    dsa,
    elementwise,
    fp8,
    linear,
    mla_rows,
    moe,
    norm,
    shape,
    v4,
    v4_attention,
    v4_mix,
    vision,
)
