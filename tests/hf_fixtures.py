"""Helpers that write tiny checkpoints in the Hugging Face hub layout, for the loader and parity tests.

A transformers model is built tiny, every tensor randomised (transformers inits some to zero or one,
which would hide bugs), saved with `save_pretrained` and then rewritten the way the hub ships
DeepSeek checkpoints: FP8 e4m3 block weights with `weight_scale_inv`, an MTP layer at index
`num_hidden_layers`, legacy `rope_scaling` config spelling, several shards with an index.

Found in transformers 5.23: `save_pretrained` writes routed experts one key per expert
(`mlp.experts.E.gate_proj.weight`, the hub form) by reverting its in-memory fusion; with
`save_original_format=False` it writes the fused `mlp.experts.gate_up_proj` [E, 2I, D]
(= cat(gate, up) on dim 1) and `mlp.experts.down_proj` [E, D, I].
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import dsgraph.models as models
import torch
from dsgraph.models import quantize_fp8_block
from safetensors import safe_open
from safetensors.torch import save_file

# The linear weights DeepSeek-V3 stores in FP8 (norms, router, embeddings, heads and eh_proj stay bf16).
# V3.2's indexer stores wq_b and wk in FP8 too; its weights_proj and k_norm stay bf16.
FP8_LINEAR = re.compile(r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|"
                        r"down_proj|wq_b|wk)\.weight$")


_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=512, rms_norm_eps=1e-6)
_MLA = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_routed_experts=8, max_position_embeddings=512, first_k_dense_replace=1)


def _yarn(mscale, mscale_all_dim):
    return {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
            "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim, "rope_theta": 10000.0}


def tiny_config(case: str):
    """A tiny transformers config per family; the comment on each line names the traps it covers."""
    from transformers import DeepseekV2Config, DeepseekV3Config, LlamaConfig, Qwen2Config
    if case == "llm":          # DeepSeek LLM 7B: MHA, plain rope; tied embeddings for coverage
        return LlamaConfig(**_LLAMA, num_key_value_heads=4, tie_word_embeddings=True)
    if case == "coder":        # DeepSeek-Coder: GQA, linear rope scaling
        return LlamaConfig(**_LLAMA, num_key_value_heads=2,
                           rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0})
    if case == "r1-llama":     # R1-Distill-Llama: GQA, llama3 rope scaling
        return LlamaConfig(**{**_LLAMA, "rms_norm_eps": 1e-5}, num_key_value_heads=2, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0})
    if case == "r1-qwen":      # R1-Distill-Qwen: GQA with q/k/v bias
        return Qwen2Config(**_LLAMA, num_key_value_heads=2)
    if case == "v2-lite":      # q_lora_rank null, greedy softmax routing, YaRN mscale = mscale_all_dim
        return DeepseekV2Config(**_MLA, q_lora_rank=None, num_experts_per_tok=3, n_shared_experts=2,
                                topk_method="greedy", rope_parameters=_yarn(0.707, 0.707))
    if case == "v2":           # q_lora, group-limited greedy (group score = max), routed scaling, mscale != all_dim
        return DeepseekV2Config(**_MLA, q_lora_rank=24, num_experts_per_tok=3, n_shared_experts=2,
                                topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                routed_scaling_factor=4.0, rope_parameters=_yarn(1.0, 0.707))
    # V3: sigmoid + noaux_tc (group score = sum of top-2) + bias for selection, norm_topk_prob, 2.5, YaRN
    return DeepseekV3Config(**_MLA, q_lora_rank=24, num_experts_per_tok=2, n_shared_experts=1, n_group=4,
                            topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                            rope_parameters=_yarn(1.0, 1.0))


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter and buffer that the checkpoint holds with fresh random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point() or "inv_freq" in name:
                continue
            if "norm" in name:
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.rand(t.shape, generator=g))   # nonnegative: see dsgraph/ops/moe.py
            elif name.endswith(".bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif "embed_tokens" in name:
                t.copy_(torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5)
    return module


def hf_model(config, seed: int = 0):
    """A transformers causal LM for `config`, randomised, eval mode, eager attention, no early stop."""
    from transformers import AutoModelForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize_(model, seed)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """Replace the checkpoint's safetensors with `shards` files (+ index when more than one)."""
    path = Path(path)
    for f in list(path.glob("*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        f.unlink()
    keys = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in keys}, str(path / "model.safetensors"))
        return
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: tensors[k].contiguous() for k in part}, str(path / fname))
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_preset(path, name="deepseek-v3-tiny", shards=1, edit=None, config_edit=None):
    """A hub-layout checkpoint of a tiny preset with its deterministic random weights (MTP layer included when the
    preset has one): config.json, safetensors shards, an index when sharded. `edit(tensors)` / `config_edit(cfg)`
    change them in place before writing."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    m = models.build_model(name, seed=0)
    tensors = {k: m.weights[k] for k in m.graph.params()}
    if edit:
        edit(tensors)
    cfg = models.preset_config(name)
    if config_edit:
        config_edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    write_tensors(path, tensors, shards)
    return path


def edit_config(path: Path, fn) -> dict:
    f = Path(path) / "config.json"
    cfg = fn(json.loads(f.read_text()))
    f.write_text(json.dumps(cfg, indent=2))
    return cfg


def legacy_rope_spelling(cfg: dict) -> dict:
    """transformers-5 `rope_parameters` -> the hub's `rope_scaling` {"type": ...} + top-level `rope_theta`."""
    rp = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rp.pop("rope_theta")
    kind = rp.pop("rope_type")
    cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
    return cfg


def unfuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 fused experts -> one key per expert, as the hub stores them."""
    out = {}
    for k, t in tensors.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            i = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{k[:-len('gate_up_proj')]}{e}.gate_proj.weight"] = t[e, :i].clone()
                out[f"{k[:-len('gate_up_proj')]}{e}.up_proj.weight"] = t[e, i:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{k[:-len('down_proj')]}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[k] = t
    return out


def quantize_ue8m0(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """V3.1 / V3.2's FP8 blocks: each block's scale rounded up to a power of two (`scale_fmt: ue8m0`), stored in the
    one-byte exponent format F8_E8M0."""
    _, scale = quantize_fp8_block(w, block)
    scale = torch.exp2(torch.ceil(torch.log2(scale)))
    bn, bk = block
    full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:w.shape[0], :w.shape[1]]
    return (w / full).to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


def fp8_roundtrip_(model: torch.nn.Module, block, ue8m0: bool = False) -> None:
    """Put the model's FP8-quantisable weights on the e4m3 block grid, so that quantising the saved
    checkpoint reproduces the values the transformers model runs with (the dequantised weights)."""
    from dsgraph.ops.mlp import dequant_fp8_block
    quant = quantize_ue8m0 if ue8m0 else quantize_fp8_block

    def grid(w):
        q, s = quant(w.float(), block)
        return dequant_fp8_block(q, s.float(), block)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if FP8_LINEAR.search(name):
                p.copy_(grid(p))
            elif name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                for e in range(p.shape[0]):
                    p[e].copy_(grid(p[e]))


def quantize_checkpoint_fp8(path: Path, block=(16, 16), shards: int = 1, ue8m0: bool = False) -> None:
    """Store the linear weights as e4m3 + `weight_scale_inv` and declare it in config.json, as DeepSeek-V3 does
    (V3.1 / V3.2 with `ue8m0`: power-of-two scales, `scale_fmt: ue8m0`)."""
    tensors = read_tensors(path)
    out = {}
    for k, t in tensors.items():
        if FP8_LINEAR.search(k):
            out[k], out[k + "_scale_inv"] = (quantize_ue8m0 if ue8m0 else quantize_fp8_block)(t.float(), block)
        else:
            out[k] = t
    write_tensors(path, out, shards)
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    edit_config(path, lambda c: {**c, "quantization_config": {**qc, **({"scale_fmt": "ue8m0"} if ue8m0 else {})}})


def mtp_layer_tensors(config, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of DeepSeek-V3's MTP module, keyed as the hub stores it (`model.layers.{L}.*`): one full
    decoder block (built by transformers, so its keys are the real ones) plus embed, enorm, hnorm, eh_proj and
    the shared head."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer
    L, d, v = config.num_hidden_layers, config.hidden_size, config.vocab_size
    block = randomize_(DeepseekV3DecoderLayer(config, layer_idx=L), seed)
    g = torch.Generator().manual_seed(seed + 1)
    extra = {"embed_tokens.weight": torch.randn(v, d, generator=g),
             "enorm.weight": 1 + 0.1 * torch.randn(d, generator=g),
             "hnorm.weight": 1 + 0.1 * torch.randn(d, generator=g),
             "eh_proj.weight": torch.randn(d, 2 * d, generator=g) / (2 * d) ** 0.5,
             "shared_head.norm.weight": 1 + 0.1 * torch.randn(d, generator=g),
             "shared_head.head.weight": torch.randn(v, d, generator=g) / d ** 0.5}
    tensors = unfuse_experts({f"model.layers.{L}.{k}": t.detach().clone() for k, t in block.state_dict().items()})
    return {**tensors, **{f"model.layers.{L}.{k}": t for k, t in extra.items()}}


def add_tensors(path: Path, extra: dict[str, torch.Tensor], shards: int = 1) -> None:
    tensors = read_tensors(path)
    tensors.update(extra)
    write_tensors(path, tensors, shards)


def one_thread():
    """Run a test module's tiny ops on one thread: on a loaded 2-core machine torch's thread pool makes a 64-wide
    linear take ~10 ms instead of ~10 us. Use as an autouse module fixture (restores the setting after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
