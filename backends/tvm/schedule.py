"""The CUDA schedule step: dlight's rules applied function by function, with the rule each function got recorded
for the compile report, and GEMMs dispatched on their row count.

dlight's GEMV rule only matches a reduction whose batch extents are literally 1, and the module is built once
for every batch size and length (B, S symbolic), so a decode projection would fall to the Matmul rule (or worse).
A GEMM whose only symbolic extent is its row count M (the flattened B*S of `te.nt_matmul`) is therefore
scheduled several times and the variants joined in one PrimFunc by a branch on M, the way MLC-LLM builds its
decode step: M <= 1, <= 4 and <= 16 run dlight's LowBatchGEMV schedule for that bucket (each weight row read once
per bucket of rows, reduction across threads), larger M the Matmul schedule. Where LowBatchGEMV has no schedule
for a bucket (outer-reduction layouts above 4 rows) that bucket is left out. Functions the lowering tagged
(`dsgraph.kernel`: the MoE grouped GEMM, the split-KV MLA) get the hand schedules of schedule_moe.py and
schedule_mla.py.

fp16 GEMMs carry `dlight.do_not_tensorize`: in apache-tvm 0.27 the Matmul rule's WMMA tensorization segfaults
inside `Tensorize` (seen for fp16 at every shape tried), so Matmul schedules them on CUDA cores, as it does bf16.
"""
from __future__ import annotations

from .deps import dlight as dl
from .deps import tirx, tvm
from .dispatch import join
from .lower.mla_split import CHUNK
from .lower.mla_split import KERNEL as MLA_SPLIT
from .lower.moe_tiles import GROUPED_GEMM, KERNEL_ATTR, TILE_ROWS
from .schedule_mla import schedule_mla_split
from .schedule_moe import schedule_grouped_gemm

GEMV_BUCKETS = (1, 4, 16)
SHOWN = 12  # function names listed per rule in the report
_SCHEDULED = "tirx.is_scheduled"


def _rules():
    return [("Matmul", dl.gpu.Matmul()), ("GEMV", dl.gpu.GEMV()), ("Reduction", dl.gpu.Reduction()),
            ("GeneralReduction", dl.gpu.GeneralReduction()), ("Fallback", dl.gpu.Fallback())]


def _first(space):
    return space[0] if isinstance(space, list) else space


def _buffer_params(func) -> list:
    """The function's tensor parameters (in TVM 0.27 buffer-typed Vars with a shape; scalars have none)."""
    return [p for p in func.params if getattr(p, "shape", None) is not None]


def _rows_extent(func):
    """The one non-constant extent among the buffers' dims, if there is exactly one distinct such expression."""
    exprs = {}
    for buf in _buffer_params(func):
        for d in buf.shape:
            if not isinstance(d, tirx.IntImm):
                exprs.setdefault(str(d), d)
    return next(iter(exprs.values())) if len(exprs) == 1 else None


def _gemv_dispatch(func, target):
    """One PrimFunc branching on the row count over LowBatchGEMV buckets and Matmul, or None if `func` is not a
    GEMM with a single symbolic row extent. Returns (func, label)."""
    rows = _rows_extent(func)
    if rows is None:
        return None
    variants = []
    for bucket in GEMV_BUCKETS:
        try:
            sch = dl.gpu.LowBatchGEMV(bucket).apply(func, target, False)
        except AssertionError:  # the rule's own shape checks on layouts it does not cover
            sch = None
        if sch is not None:
            variants.append((bucket, _first(sch).mod["main"]))
    if not variants:
        return None
    big = _first(dl.gpu.Matmul().apply(func, target, False))
    if big is None:
        return None
    joined = join(func, [(rows <= bucket, low) for bucket, low in variants], big.mod["main"])
    label = "GEMV dispatch (" + ", ".join(f"M<={b}: LowBatchGEMV({b})" for b, _ in variants) + ", else Matmul)"
    return joined, label


def _hand_scheduled(func):
    """Functions the lowering tagged for a schedule of ours (schedule_moe.py). Returns (func, label) or None."""
    kernel = func.attrs.get(KERNEL_ATTR)
    if kernel == MLA_SPLIT:
        return schedule_mla_split(func), f"hand: split-KV MLA ({CHUNK}-row chunks, online-softmax reduce)"
    if kernel != GROUPED_GEMM:
        return None
    x, w = _buffer_params(func)[:2]
    return (schedule_grouped_gemm(func, int(w.shape[0]), x.shape[0]),
            f"hand: grouped GEMM (M<=E: GEMV over tiles, else {TILE_ROWS}x64 tiles, weights in shared memory)")


def _has_fp16(func) -> bool:
    return any(str(b.dtype) == "float16" for b in _buffer_params(func))


class Schedules:
    """`apply` is a module pass; `chosen` maps each scheduled PrimFunc's name to the rule that scheduled it
    (filled when the pass runs inside the build)."""

    def __init__(self):
        self.chosen: dict[str, str] = {}

    def apply(self, mod, target):
        updated = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or int(func.attrs.get(_SCHEDULED, 0)) == 1:
                continue
            if _has_fp16(func):
                func = func.with_attr("dlight.do_not_tensorize", True)
            picked = _hand_scheduled(func) or _gemv_dispatch(func, target)
            if picked is None:
                picked = next(((_first(s).mod["main"], name) for name, rule in _rules()
                               if (s := rule.apply(func, target, False)) is not None), None)
            if picked is None:
                self.chosen[gv.name_hint] = "unscheduled"
                continue
            updated[gv] = picked[0].with_attr(_SCHEDULED, True)
            self.chosen[gv.name_hint] = picked[1]
        for gv, func in updated.items():
            mod[gv] = func
        return mod

    def as_pass(self, target):
        @tvm.transform.module_pass(opt_level=0, name="DSGraphSchedule")
        def _pass(mod, _ctx):
            return self.apply(mod, target)
        return _pass

    def notes(self) -> list[str]:
        """One line per rule: how many functions it scheduled, and their names."""
        by_rule: dict[str, list[str]] = {}
        for name, rule in sorted(self.chosen.items()):
            by_rule.setdefault(rule, []).append(name)
        lines = []
        for rule, names in sorted(by_rule.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(names[:SHOWN]) + (f", … (+{len(names) - SHOWN})" if len(names) > SHOWN else "")
            lines.append(f"schedule {rule}: {len(names)} function(s): {shown}")
        return lines
