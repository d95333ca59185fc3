"""Running a sharded graph on torch.distributed: the process group (NCCL on GPUs, gloo on CPUs, as torchrun
sets up), which rank this process is, and the per-rank report lines.

The collectives themselves are the `dist.*` ops (dsgraph/ops/dist.py): their one-process reference calls
torch.distributed on the default group, so the eager backend and every backend that falls back to references
run sharded graphs unchanged; a faster all-to-all kernel can replace the op's lowering later.
"""
from __future__ import annotations

import atexit
import os
from collections import Counter

import torch
import torch.distributed as tdist

from dsgraph.errors import ConfigError
from dsgraph.ops.dist import forget_groups, process_group
from dsgraph.parallel import ParallelPlan


def init(device: str = "cpu") -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR/PORT in the environment) if this
    process has not yet; returns (rank, world size). A process torchrun did not launch is rank 0 of 1 with no
    group; under torchrun --nproc-per-node 1 it joins a group of one (collectives then run through NCCL / gloo)."""
    if tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return 0, 1
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    tdist.init_process_group(backend)
    atexit.register(shutdown)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", tdist.get_rank())))
    return tdist.get_rank(), tdist.get_world_size()


def init_groups(plan: ParallelPlan) -> None:
    """Create the TP subgroups of `plan` now (tp < world: contiguous blocks of tp ranks, `torch.distributed`
    `new_subgroups`), on every rank together and before any step runs, so none is created inside a CUDA-graph
    capture or in a different order on different ranks. Nothing to create in one process or when tp is 1 or the
    world."""
    if tdist.is_initialized() and 1 < plan.tp < tdist.get_world_size():
        process_group(plan.tp)


def shutdown() -> None:
    """Leave the process group together (a rank exiting while gloo's threads still run aborts the process)."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
        forget_groups()


def rank_for(plan: ParallelPlan, rank: int | None = None) -> int:
    """This process's rank of `plan`: `rank` if given (one process building another rank's graph), else the
    process group's, which must hold exactly the plan's world."""
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    if rank is not None:
        return rank
    if world != plan.world:
        how = "launch with torchrun --nproc-per-node" if world == 1 else "launch with --nproc-per-node"
        raise ConfigError(f"{plan} needs {plan.world} ranks, this process group has {world}: {how} {plan.world}")
    return tdist.get_rank() if world > 1 else 0


def shard_note(graph, full_graph) -> str:
    """One report line: this rank's share of the parameters and cache, and the collectives it issues."""
    meta = graph.meta.get("shard", {})
    plan = ParallelPlan(**meta.get("plan", {}))
    mine, full = graph.summary(), full_graph.summary()
    colls = Counter(n.op.removeprefix("dist.") for n in graph.nodes if n.op.startswith("dist."))
    return (f"parallel {plan}: rank {meta.get('rank', 0)} of {plan.world} holds {mine.params:,} params "
            f"({mine.param_bytes / 2**20:.1f} MiB) of {full.params:,} ({full.param_bytes / 2**20:.1f} MiB); "
            f"KV cache {mine.kv_bytes_per_token} B/token (unsharded {full.kv_bytes_per_token}); "
            f"collectives per step: {', '.join(f'{k}x{v}' for k, v in sorted(colls.items())) or 'none'}")


def read_note(weights, rank: int) -> str | None:
    """What this rank read of its checkpoint (None for weights that come from no checkpoint)."""
    reader = getattr(weights, "reader", None)
    if reader is None or not hasattr(reader, "bytes_read"):
        return None
    done, total = reader.bytes_read, reader.total_bytes
    return (f"rank {rank} read {done / 2**20:.2f} MiB of the checkpoint's {total / 2**20:.2f} MiB "
            f"({done / max(total, 1):.0%})")

