"""TVM's modules as the compiler half of this backend uses them, each imported at its first use
(backends/optional.py): `import dsgraph.backends` stays free of TVM, and a runtime-only process that loads a
saved module (runtime.py) never touches TVM's compiler."""
from __future__ import annotations

from ..optional import optional

tvm = optional("tvm", extra="tvm")
relax = optional("tvm.relax", extra="tvm")
te = optional("tvm.te", extra="tvm")
tirx = optional("tvm.tirx", extra="tvm")
dlight = optional("tvm.s_tir.dlight", extra="tvm")
s_tir = optional("tvm.s_tir", extra="tvm")
