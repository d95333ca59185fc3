"""dsgraph op -> Relax lowerings, one module per op family (importing this package registers them all).

Needs TVM's compiler (`tvm.relax`); the runtime-only loader (backends/tvm/runtime.py) never imports it.
"""
from . import attention, elementwise, fp8, index, linalg, mlp, moe, norm, reduce, rope, routing, shape  # noqa: F401
from .context import DerivedParam, LowerCtx  # noqa: F401
from .registry import Lowered, lower, lowered_ops, lowering_for  # noqa: F401
