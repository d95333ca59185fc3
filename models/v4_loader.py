"""DeepSeek-V4 checkpoints in DeepSeek's own key naming (`embed.weight`, `layers.N.attn.wq_a.weight`,
`layers.N.ffn.experts.E.w1.weight`, `hc_head_fn`, ...: the graph's param names, so keys map 1:1), read lazily.

Quantisation as shipped: attention and dense linears in FP8 e4m3 with `X.scale` block scales (float32 or ue8m0
`F8_E8M0`), routed experts in MXFP4 (`X.weight` int8 [O, I/2], two e2m1 values a byte, low nibble first, and
`X.scale` e8m0 exponents [O, I/32]); both dequantise per tensor on first use, or stay quantised in the graph
(`keep_fp8`: dequant_fp8 nodes; `keep_fp4`: dequant_mxfp4 nodes, for an MXFP4 GEMM to claim). The MTP block ships
as `mtp.0.*` (e_proj / h_proj FP8 like the attention, its experts MXFP4): built when present and `mtp=True`.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from dsgraph.ops.v4_mix import MXFP4_BLOCK, unpack_e2m1
from dsgraph.weights import SliceableEntry, WeightStore

from .hf_scales import SCALE_DTYPES, read_scale
from .hf_shards import FLOAT_DTYPES, Shards, dequant_read
from .model import build_graph
from .v4_config import V4Config

FP4_DTYPES = ("int8", "uint8")
E8M0_DTYPES = ("uint8", "float8_e8m0fnu")


def v4_graph_config(cfg: V4Config, keep_fp8: bool, keep_fp4: bool) -> V4Config:
    return replace(cfg, fp8_block_size=cfg.fp8_block_size if keep_fp8 else None,
                   expert_dtype=cfg.expert_dtype if keep_fp4 else None)


def build_v4(cfg: V4Config, shards: Shards, dtype: str, name: str, keep_fp8: bool, keep_fp4: bool, notes: list,
             mtp: bool = True):
    """(graph, lazy weights, missing, unexpected, wrong) for hf_loader to report together."""
    skipped = _mtp_skipped(cfg, shards, mtp, notes)
    graph = build_graph(v4_graph_config(cfg, keep_fp8, keep_fp4), dtype, name=name, mtp="mtp.0." not in skipped)
    store, used, missing, wrong = WeightStore(reader=shards), set(), [], []
    for pname, v in graph.params().items():
        want, want_dtype = v.type.concrete({}), v.type.dtype
        scale = pname.removesuffix(".weight") + ".scale" if pname.endswith(".weight") else None
        quantised = scale in shards and pname in shards and want_dtype not in ("float8_e4m3fn", "int8")
        if quantised:
            entry = _dequant(pname, scale, want, shards, cfg, wrong)
            used.update((pname, scale))
        elif pname in shards:
            entry = _direct(pname, want, want_dtype, shards, cfg, wrong)
            used.add(pname)
        else:
            missing.append(f"{pname} {list(want)}")
            continue
        if entry is not None:
            store.set(pname, entry)
    unexpected = [k for k in shards.info if k not in used and not k.startswith(skipped)]
    return graph, store, missing, unexpected, wrong


def _mtp_skipped(cfg: V4Config, shards: Shards, mtp: bool, notes: list) -> tuple[str, ...]:
    """Key prefixes of MTP blocks not built: all with mtp=False or none in the checkpoint; those past the first."""
    n = cfg.num_nextn_predict_layers
    blocks = tuple(f"mtp.{j}." for j in range(max(n, 1)))
    present = {p for p in blocks if any(k.startswith(p) for k in shards.info)}
    if not mtp or n == 0:
        return blocks
    if blocks[0] not in present:
        notes.append(f"config.json sets num_nextn_predict_layers={n} but the checkpoint has no mtp.0.* weights; "
                     "built without the MTP block")
        return blocks
    if n > 1:
        notes.append(f"{n} MTP blocks in the config; dsgraph builds the first, ignoring {list(blocks[1:])}")
    return blocks[1:]


def _direct(name, want, want_dtype, shards: Shards, cfg, wrong: list):
    info = shards.info[name]
    if info.shape != want:
        wrong.append(f"{name}: checkpoint {list(info.shape)}, model expects {list(want)}")
        return None
    ok = {"float8_e4m3fn": ("float8_e4m3fn",), "int8": FP4_DTYPES, "uint8": E8M0_DTYPES, "int64": ("int64", "int32")}
    allowed = ok.get(want_dtype, SCALE_DTYPES if name.endswith(".scale") else FLOAT_DTYPES)
    if info.dtype not in allowed:
        wrong.append(f"{name}: checkpoint dtype {info.dtype}, model expects one of {list(allowed)}")
        return None
    if want_dtype == "uint8":      # e8m0 exponents, whichever way they were stored
        return lambda: shards.read(name).view(torch.uint8)
    if name.endswith(".scale") and want_dtype == "float32":
        return SliceableEntry(lambda index: read_scale(shards, name, cfg.fp8_scale_fmt, index))
    if want_dtype == "int64":
        return lambda: shards.read(name).long()
    return SliceableEntry(lambda index: shards.read(name, index))


def _dequant(name, scale, want, shards: Shards, cfg, wrong: list):
    w, s = shards.info[name], shards.info[scale]
    if w.dtype in FP4_DTYPES:
        grid = (want[0], want[1] // MXFP4_BLOCK)
        if w.shape != (want[0], want[1] // 2) or s.shape != grid or s.dtype not in E8M0_DTYPES:
            wrong.append(f"{name}: checkpoint {w.dtype}{list(w.shape)} with scales {s.dtype}{list(s.shape)}, MXFP4 "
                         f"expects int8{[want[0], want[1] // 2]} with e8m0 scales {list(grid)}")
            return None
        return lambda: dequant_mxfp4_read(shards, name, scale)
    block = cfg.fp8_block_size
    grid = (-(-want[0] // block[0]), -(-want[1] // block[1])) if block and len(want) == 2 else None
    if w.shape != want or w.dtype != "float8_e4m3fn" or s.shape != grid or s.dtype not in SCALE_DTYPES:
        wrong.append(f"{name}: checkpoint {w.dtype}{list(w.shape)} with scales {list(s.shape)}, model expects "
                     f"float8_e4m3fn{list(want)} with {block} block scales {list(grid or ())}")
        return None
    return SliceableEntry(lambda index: dequant_read(shards, name, scale, block, index, cfg.fp8_scale_fmt))


def dequant_mxfp4_read(shards: Shards, name: str, scale: str) -> torch.Tensor:
    """fp32 [O, I] of an MXFP4 weight: e2m1 values times 2**(e8m0 - 127) per 32 along I."""
    exp = shards.read(scale).view(torch.uint8).float() - 127.0
    return unpack_e2m1(shards.read(name)) * torch.exp2(exp).repeat_interleave(MXFP4_BLOCK, dim=1)
