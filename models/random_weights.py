"""Deterministic random weights, generated lazily per tensor.

Each weight is drawn from its own generator seeded by (seed, name), so a weight is
the same whichever others are materialised, and a full-size preset "has" weights
without allocating them until asked.
"""
from __future__ import annotations

import zlib

import torch

from dsgraph.dtypes import to_torch
from dsgraph.weights import WeightStore

FP8_MAX = 448.0


def _gen(seed: int, name: str, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [N, K] -> (e4m3 [N, K], fp32 scale_inv [ceil(N/bn), ceil(K/bk)]) as DeepSeek-V3 stores them."""
    bn, bk = block
    n, k = w.shape
    sn, sk = -(-n // bn), -(-k // bk)
    padded = w.new_zeros(sn * bn, sk * bk, dtype=torch.float32)
    padded[:n, :k] = w
    blocks = padded.view(sn, bn, sk, bk)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).view(sn * bn, sk * bk)[:n, :k]
    return q.to(torch.float8_e4m3fn), scale.float()


def random_tensor(name: str, shape: tuple[int, ...], dtype: str, seed: int, device: str = "cpu") -> torch.Tensor:
    """One weight, drawn on `device` (a full-size model's weights are made on the GPU directly)."""
    g = _gen(seed, name, device)
    if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith("enorm.weight"):
        t = 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)
    elif name.endswith("e_score_correction_bias"):
        t = 0.1 * torch.rand(shape, generator=g, device=device)   # nonnegative: see dsgraph/ops/moe.py on masking
    elif name.endswith(".bias"):
        t = 0.1 * torch.randn(shape, generator=g, device=device)
    elif "embed_tokens" in name:
        t = torch.randn(shape, generator=g, device=device)
    else:
        t = torch.randn(shape, generator=g, device=device) / max(shape[-1], 1) ** 0.5
    return t.to(to_torch(dtype))


def random_weights(graph, seed: int = 0, device: str = "cpu") -> WeightStore:
    """Lazy random weights for every param of `graph` (FP8 params come with matching scales).
    The same seed gives the same values on one device; CPU and CUDA generators differ."""
    store = WeightStore()
    fp8 = {n.inputs[0].name: (n.inputs[1].name, n.attrs["block"]) for n in graph.nodes if n.op == "dequant_fp8"}
    for name, v in graph.params().items():
        shape = v.type.concrete({})
        if name in fp8:
            scale_name, block = fp8[name]
            store.set(name, lambda n=name, s=shape, b=block: quantize_fp8_block(
                random_tensor(n, s, "float32", seed, device), b)[0])
            store.set(scale_name, lambda n=name, s=shape, b=block: quantize_fp8_block(
                random_tensor(n, s, "float32", seed, device), b)[1])
        elif name not in store:
            store.set(name, lambda n=name, s=shape, d=v.type.dtype: random_tensor(n, s, d, seed, device))
    return store


__all__ = ["quantize_fp8_block", "random_tensor", "random_weights"]
