"""dsgraph op -> Relax lowerings, one module per op family (importing this package registers them all in TABLE).

Importing it does not import TVM (backends/optional.py): the lowerings need TVM's compiler (`tvm.relax`) only
when they run; the runtime-only loader (backends/tvm/runtime.py) never runs them.
"""
from . import attention, dsa, elementwise, fp8, index, linalg, mlp, moe, norm, reduce, rope, routing, shape  # noqa: F401
from .context import DerivedParam, LowerCtx  # noqa: F401
from .registry import TABLE, Lowered  # noqa: F401
