"""Tiny DeepSeek-V4 checkpoints in DeepSeek's own naming (what the hub ships), and the transformers oracle.

The weights are a dsgraph preset's random ones (every tensor random, none zero or one), the MTP block's under
`mtp.0.*` as DeepSeek ships it (its own attention, MoE, mHC and hyper-head params, e_proj / h_proj, enorm / hnorm /
norm; embed and head shared with the main model); `quantised=True` stores attention, shared-expert and the MTP
projections as FP8 e4m3 with `X.scale` block scales and routed experts as MXFP4 (int8 nibble pairs, uint8 e8m0
scales per 32), as V4's checkpoints do. The oracle is transformers'
DeepseekV4ForCausalLM loaded from a float copy through its own conversion mapping (DeepSeek names -> its own).
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from dsgraph.models import build_model, preset_config, quantize_fp8_block
from safetensors.torch import save_file

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP8 = re.compile(r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)\.weight$|shared_experts\.w[123]\.weight$"
                 r"|^mtp\.0\.[eh]_proj\.weight$")
FP4 = re.compile(r"\.experts\.\d+\.w[123]\.weight$")


def quantize_mxfp4(w: torch.Tensor):
    """fp32 [O, I] -> (int8 [O, I/2] low nibble first, uint8 e8m0 [O, I/32]) and its dequantised value."""
    o, i = w.shape
    blocks = w.reshape(o, i // 32, 32)
    exp = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    scaled = blocks / torch.exp2(exp)[..., None]
    code = (scaled.abs()[..., None] - E2M1).abs().argmin(-1) | ((scaled < 0).long() << 3)
    code = code.reshape(o, i)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    value = (E2M1[code & 7] * torch.where(code >= 8, -1.0, 1.0)).reshape(o, i // 32, 32) * torch.exp2(exp)[..., None]
    return packed, (exp + 127).to(torch.uint8), value.reshape(o, i)


def v4_config_json(preset: str = "deepseek-v4-tiny", quantised: bool = False, **over) -> dict:
    cfg = {**preset_config(preset), **over, "architectures": ["DeepseekV4ForCausalLM"]}
    rs = cfg.pop("rope_scaling")   # transformers-5 spelling; the loader reads both
    cfg["rope_parameters"] = {**{k: v for k, v in rs.items() if k != "type"}, "rope_type": "yarn"}
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16],
                                  "scale_fmt": "ue8m0", "expert_dtype": "fp4"} if quantised else None
    if not quantised:
        cfg.pop("quantization_config")
    return cfg


def write_v4(path, seed: int = 0, quantised: bool = False, **over):
    """A V4 checkpoint directory; returns the float tensors it stands for (dequantised where quantised)."""
    model = build_model("deepseek-v4-tiny", seed=seed, overrides=over or None)
    float_w = {k: model.weights[k].contiguous() for k in model.graph.params()}
    stored, meant = {}, {}
    for k, w in float_w.items():
        if quantised and FP8.search(k):
            q, s = quantize_fp8_block(w, (16, 16))
            s = torch.exp2(torch.ceil(torch.log2(s)))          # ue8m0: power-of-two block scales
            q = (w / s.repeat_interleave(16, 0)[:w.shape[0]].repeat_interleave(16, 1)[:, :w.shape[1]]).to(q.dtype)
            stored[k], stored[k.removesuffix("weight") + "scale"] = q, s
            meant[k] = q.float() * s.repeat_interleave(16, 0)[:w.shape[0]].repeat_interleave(16, 1)[:, :w.shape[1]]
        elif quantised and FP4.search(k):
            q, s, meant[k] = quantize_mxfp4(w)
            stored[k], stored[k.removesuffix("weight") + "scale"] = q, s
        else:
            stored[k] = meant[k] = w
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(v4_config_json(quantised=quantised, **over)))
    save_file(stored, str(path / "model.safetensors"))
    return meant


def oracle(path, tensors: dict, **over):
    """transformers' DeepseekV4ForCausalLM on `tensors` (float, DeepSeek names) through its conversion mapping."""
    from transformers import DeepseekV4ForCausalLM  # test oracle only
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(v4_config_json(**over)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    model, info = DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (about 10x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
