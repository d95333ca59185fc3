"""Schedule and build a translated Relax module for a target.

The Relax pipeline is TVM's own per-target one, spelled out so the schedule step is ours to choose:
library dispatch (sort/scan) -> LegalizeOps (Relax built-ins to TOPI TIR) -> fuse -> schedule ->
lower to the VM. Scheduling: on CUDA dlight's rules function by function (schedule.py: GEMMs dispatched on
their row count between LowBatchGEMV and Matmul, then Matmul, GEMV, reductions, fallback thread binding), on
LLVM the TIR as it is (TVM's default CPU lowering). With a MetaSchedule work directory (option `tune`) its tuned
schedules are applied first and dlight only schedules what the records do not cover. MetaSchedule measures
concrete shapes, so it tunes the functions whose shapes are static (weights-only work, or a graph specialised
to fixed sizes); symbolic-shape functions keep their default schedules.
"""
from __future__ import annotations

import os

from .deps import relax, tvm
from .schedule import Schedules


def make_target(device: str, tuning: bool = False) -> tvm.target.Target:
    """llvm on the CPU; CUDA for sm_90 (H100) with an llvm host, built here and run on the device machine.
    MetaSchedule's CPU search needs the core count in the target."""
    if str(device).startswith("cuda"):
        return tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    return tvm.target.Target({"kind": "llvm", **({"num-cores": os.cpu_count() or 1} if tuning else {})})


def relax_pipeline(target: tvm.target.Target, tune: dict | None = None, schedules: Schedules | None = None):
    """TVM's per-target Relax pipeline with our schedule step (`schedules`, on GPU targets); `tune` =
    {"work_dir", "trials"} adds MetaSchedule: tune `trials` (if > 0, records appended to work_dir) then apply
    the records in work_dir."""
    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        t = relax.transform
        tuned = []
        if tune is not None:
            if tune.get("trials", 0) > 0:
                tuned.append(t.MetaScheduleTuneIRMod(params={}, work_dir=tune["work_dir"],
                                                     max_trials_global=tune["trials"]))
            tuned.append(t.MetaScheduleApplyDatabase(tune["work_dir"]))
        seq = [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan(),
               t.LegalizeOps(), t.AnnotateTIROpPattern(), t.FoldConstant(), t.FuseOps(), t.FuseTIR(),
               *tuned, *([schedules.as_pass(target)] if schedules and "gpu" in target.keys else []),
               t.RewriteDataflowReshape(), t.ToNonDataflow(), t.RemovePurityChecking(), t.CallTIRRewrite(),
               t.StaticPlanBlockMemory(), t.LowerAllocTensor(), t.KillAfterLastUse(), t.LowerRuntimeBuiltin(),
               t.ComputePrimValue(), t.VMShapeLower(), t.AttachGlobalSymbol()]
        with target:
            return tvm.transform.Sequential(seq)(mod)

    return _pipeline


def build(mod: tvm.IRModule, target: tvm.target.Target, tune: dict | None = None):
    """IRModule -> (VM executable, exportable with `export_library`; the Schedules that recorded each
    function's rule)."""
    schedules = Schedules()
    return tvm.compile(mod, target, relax_pipeline=relax_pipeline(target, tune, schedules)), schedules
