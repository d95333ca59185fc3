"""How results are compared, in one place: the relative error and the tolerances every check uses.

`rel_err` is ‖out − ref‖ / ‖ref‖ in float64 (the plain difference norm when ref is all zeros). Tolerances are
by what is compared and its dtype (DESIGN.md, Numerics):
  pass   the interpreter before and after a rewrite, same dtype (only reassociation differs);
  op     a kernel or lowered op against its torch reference;
  model  whole-model logits of two implementations (rounding compounds layer after layer, and a near-tied router
         choice can flip: twice the op tolerance in half precision; a wrong kernel is O(1)).
FP8 GEMMs in DeepSeek's W8A8 numerics also round activations to e4m3 per 128-value group: each lands within a few
percent of the dequantised-weight reference, so a report that names a w8a8 kernel widens the op/model tolerance.
"""
from __future__ import annotations

import torch

TOLERANCE: dict[str, dict[str, float]] = {
    "pass": {"float64": 1e-10, "float32": 2e-5, "float16": 1e-2, "bfloat16": 2e-2},
    "op": {"float64": 1e-10, "float32": 1e-4, "float16": 2e-2, "bfloat16": 3e-2},
    "model": {"float64": 1e-10, "float32": 1e-4, "float16": 4e-2, "bfloat16": 6e-2},
}
W8A8_TOLERANCE = 8e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; the difference norm itself when ref is all zeros."""
    out, ref = out.double(), ref.double()
    denom, diff = ref.norm(), (out - ref).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def tolerance(dtype: str, level: str = "op", report=None) -> float:
    """The tolerance for comparing at `level` ("pass" | "op" | "model") in `dtype`; a compile `report` that shows an
    FP8 GEMM quantising activations (note "w8a8") widens it to W8A8_TOLERANCE."""
    tol = TOLERANCE[level][dtype]
    if report is not None and any("w8a8" in k.note for k in report.kernels):
        tol = max(tol, W8A8_TOLERANCE)
    return tol
