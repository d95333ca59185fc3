"""Will a compiled model's weights fit the device? Checked before a backend materialises any weight, so a
model too large for the machine is refused in a second with the sizes, not after minutes of allocation."""
from __future__ import annotations

import os

import torch

from dsgraph.dtypes import to_torch
from dsgraph.errors import DeviceMemoryError

SKIP_ENV = "DSGRAPH_SKIP_MEMORY_CHECK"


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (CUDA: free device memory; CPU: MemAvailable on Linux), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def weight_bytes(graph, weights, device: torch.device) -> int:
    """Bytes the graph's params will newly occupy on `device`: a weight already there in its declared dtype
    costs nothing more; one elsewhere or lazy costs its declared size, once per source tensor (shared weights)."""
    total, seen = 0, set()
    for name, v in graph.params().items():
        dtype = to_torch(v.type.dtype)
        entry = weights.entry(name) if name in weights else None
        if isinstance(entry, torch.Tensor):
            if entry.device == device and entry.dtype == dtype:
                continue
            key = (entry.untyped_storage().data_ptr(), entry.storage_offset(), dtype)
        else:
            key = name
        if key not in seen:
            seen.add(key)
            total += v.type.nbytes()
    return total


def check_weights_fit(graph, weights, device: torch.device, what: str) -> None:
    """Raise DeviceMemoryError if the weights cannot fit the free memory (skip with DSGRAPH_SKIP_MEMORY_CHECK=1)."""
    if os.environ.get(SKIP_ENV):
        return
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    free = available_bytes(device)
    need = weight_bytes(graph, weights, device)
    if free is not None and need > free:
        raise DeviceMemoryError(
            f"{what}: its weights need {need / 2**30:,.1f} GiB on {device} after the passes, but only "
            f"{free / 2**30:,.1f} GiB is free. Use a smaller model (a -tiny preset, fewer layers), a narrower "
            f"dtype (bf16, or keep FP8 checkpoints as FP8), or a device with more memory; "
            f"{SKIP_ENV}=1 skips this check")
