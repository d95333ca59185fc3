"""Presets: the released DeepSeek-family sizes (HF config.json values) and a `-tiny`
variant of each family for tests and the demo."""
from __future__ import annotations

from dsgraph.errors import ConfigError

from .v4_config import V4_PRESETS, V4_TINY

_YARN_V2 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
_YARN_V3 = {**_YARN_V2, "mscale": 1.0, "mscale_all_dim": 1.0}
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def _llama(hidden, inter, layers, heads, kv, vocab=102400, **kw):
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, **kw}


def _qwen2(hidden, inter, layers, heads, kv, vocab=152064, **kw):
    return {**_llama(hidden, inter, layers, heads, kv, vocab), "model_type": "qwen2",
            "max_position_embeddings": 131072, **kw}


_MOE16B = {"model_type": "deepseek", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "num_hidden_layers": 28, "num_attention_heads": 16,
           "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
           "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax",
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
_V2_LITE = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
            "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
            "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
            "first_k_dense_replace": 1, "moe_layer_freq": 1, "q_lora_rank": None, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "routed_scaling_factor": 1.0,
            "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
            "scoring_func": "softmax", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "rope_scaling": _YARN_V2}
_V2 = {**_V2_LITE, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
       "num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 160,
       "q_lora_rank": 1536, "routed_scaling_factor": 16.0, "topk_method": "group_limited_greedy", "n_group": 8,
       "topk_group": 3}
_V3 = {**_V2, "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
       "moe_intermediate_size": 2048, "num_hidden_layers": 61, "n_routed_experts": 256, "n_shared_experts": 1,
       "num_experts_per_tok": 8, "first_k_dense_replace": 3, "routed_scaling_factor": 2.5, "topk_method": "noaux_tc",
       "n_group": 8, "topk_group": 4, "norm_topk_prob": True, "scoring_func": "sigmoid",
       "rope_scaling": _YARN_V3, "num_nextn_predict_layers": 1,
       "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                               "weight_block_size": [128, 128]}}

# V3.1 / V3.1-Terminus: V3's architecture, FP8 block scales that are powers of two (`scale_fmt: ue8m0`)
_UE8M0 = {**_V3["quantization_config"], "scale_fmt": "ue8m0"}
_V31 = {**_V3, "quantization_config": _UE8M0}
# V3.2-Exp / V3.2: V3.1 plus DeepSeek Sparse Attention (a lightning indexer per layer, top-2048 sparse MLA)
_V32 = {**_V31, "model_type": "deepseek_v32", "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}

PRESETS: dict[str, dict] = {
    "deepseek-llm-7b": _llama(4096, 11008, 30, 32, 32),
    "deepseek-llm-67b": _llama(8192, 22016, 95, 64, 8),
    "deepseek-math-7b": _llama(4096, 11008, 30, 32, 32),
    "deepseek-coder-6.7b": _llama(4096, 11008, 32, 32, 32, vocab=32256, rope_theta=100000.0,
                                  max_position_embeddings=16384, rope_scaling={"type": "linear", "factor": 4.0}),
    "deepseek-coder-33b": _llama(7168, 19200, 62, 56, 8, vocab=32256, rope_theta=100000.0,
                                 max_position_embeddings=16384, rope_scaling={"type": "linear", "factor": 4.0}),
    "r1-distill-qwen-1.5b": _qwen2(1536, 8960, 28, 12, 2, vocab=151936),
    "r1-distill-qwen-7b": _qwen2(3584, 18944, 28, 28, 4),
    "r1-distill-qwen-14b": _qwen2(5120, 13824, 48, 40, 8, rms_norm_eps=1e-5, rope_theta=1e6),
    "r1-distill-qwen-32b": _qwen2(5120, 27648, 64, 40, 8, rms_norm_eps=1e-5, rope_theta=1e6),
    "r1-distill-llama-8b": _llama(4096, 14336, 32, 32, 8, vocab=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                                  max_position_embeddings=131072, rope_scaling=_LLAMA3),
    "r1-distill-llama-70b": _llama(8192, 28672, 80, 64, 8, vocab=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                                   max_position_embeddings=131072, rope_scaling=_LLAMA3),
    "deepseek-moe-16b": _MOE16B,
    "deepseek-v2-lite": _V2_LITE,
    "deepseek-v2": _V2,
    "deepseek-v2.5": _V2,
    "deepseek-coder-v2": _V2,
    "deepseek-coder-v2-lite": _V2_LITE,
    "deepseek-v3": _V3,
    "deepseek-r1": _V3,
    "deepseek-v3.1": _V31,
    "deepseek-v3.2": _V32,
}

_TINY_MLA = {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
             "qk_rope_head_dim": 8, "v_head_dim": 16, "vocab_size": 256, "max_position_embeddings": 512,
             "first_k_dense_replace": 1}
TINY: dict[str, dict] = {
    "deepseek-llm-tiny": _llama(64, 128, 2, 4, 4, vocab=256, max_position_embeddings=512),
    "deepseek-coder-tiny": _llama(64, 128, 2, 4, 2, vocab=256, max_position_embeddings=512, rope_theta=100000.0,
                                  rope_scaling={"type": "linear", "factor": 4.0}),
    "r1-distill-qwen-tiny": _qwen2(64, 128, 2, 4, 2, vocab=256, max_position_embeddings=512),
    "r1-distill-llama-tiny": _llama(64, 128, 2, 4, 2, vocab=256, rope_theta=500000.0, rms_norm_eps=1e-5,
                                    max_position_embeddings=512,
                                    rope_scaling={**_LLAMA3, "original_max_position_embeddings": 64}),
    "deepseek-moe-tiny": {**_MOE16B, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
                          "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
                          "num_key_value_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 3,
                          "max_position_embeddings": 512},
    "deepseek-v2-lite-tiny": {**_V2_LITE, **_TINY_MLA, "n_routed_experts": 8, "num_experts_per_tok": 3,
                              "rope_scaling": {**_YARN_V2, "factor": 4, "original_max_position_embeddings": 64}},
    "deepseek-v2-tiny": {**_V2, **_TINY_MLA, "q_lora_rank": 24, "n_routed_experts": 8, "num_experts_per_tok": 3,
                         "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.0,
                         "rope_scaling": {**_YARN_V2, "factor": 4, "original_max_position_embeddings": 64}},
    "deepseek-v3-tiny": {**_V3, **_TINY_MLA, "q_lora_rank": 24, "n_routed_experts": 8, "num_experts_per_tok": 2,
                         "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "quantization_config": None,
                         "rope_scaling": {**_YARN_V3, "factor": 4, "original_max_position_embeddings": 64}},
    "deepseek-v3-fp8-tiny": {**_V3, **_TINY_MLA, "q_lora_rank": 24, "n_routed_experts": 8,
                             "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
                             "rope_scaling": {**_YARN_V3, "factor": 4, "original_max_position_embeddings": 64},
                             "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                     "weight_block_size": [16, 16]}},
    # index_topk 3 < the tests' 4-token prompts and cached lengths: the sparsity changes every layer's output
    "deepseek-v3.2-tiny": {**_V32, **_TINY_MLA, "q_lora_rank": 24, "n_routed_experts": 8, "num_experts_per_tok": 2,
                           "n_group": 4, "topk_group": 2, "quantization_config": None, "index_n_heads": 4,
                           "index_head_dim": 16, "index_topk": 3,
                           "rope_scaling": {**_YARN_V3, "factor": 4, "original_max_position_embeddings": 64}},
}
PRESETS.update(V4_PRESETS)
TINY.update(V4_TINY)
PRESETS.update(TINY)
TINY_PRESETS = tuple(TINY)


def preset_config(name: str) -> dict:
    """The HF-style config dict of a preset (a copy)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}: not a preset, checkpoint directory or saved graph. "
                          f"Presets: {', '.join(sorted(PRESETS))}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}
