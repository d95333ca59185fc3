"""FP8 block scales as the hub ships them: float32 `weight_scale_inv` (V3, R1), or V3.1 / V3.2's `scale_fmt: ue8m0`
ones -- powers of two, stored as float32 or as the one-byte exponent format `F8_E8M0` (torch.float8_e8m0fnu).

Either way the graph sees float32 scales. A ue8m0 checkpoint whose scales are not powers of two is refused: its
config and tensors disagree, and a kernel relying on exponent-only scales would compute something else.
"""
from __future__ import annotations

import torch

from dsgraph.errors import CheckpointError

E8M0 = "float8_e8m0fnu"
SCALE_DTYPES = ("float32", E8M0)


def read_scale(shards, key: str, scale_fmt: str | None, index=None) -> torch.Tensor:
    """The block scales `key` (or `scales[index]`) as float32, checked against the config's scale format."""
    s = shards.read(key, index)
    stored = shards.info[key].dtype
    s = s.float()
    if scale_fmt == "ue8m0" and stored != E8M0:
        mantissa, _ = torch.frexp(s)
        if not bool(((mantissa == 0.5) & (s > 0)).all()):
            raise CheckpointError(f"{shards.root}: {key} holds scales that are not powers of two, but config.json "
                                  "sets quantization_config.scale_fmt 'ue8m0'; fix the config (drop scale_fmt) or "
                                  "the checkpoint")
    return s
