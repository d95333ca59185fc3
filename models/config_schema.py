"""The typed schema of a model config: each key's type, range and a sane upper bound, checked on load.

A config.json (or an artifact's manifest, or a saved graph's meta) is untrusted input: `"three"` layers must be a
ConfigError naming the key, not a TypeError deep in the builder, and `1e8` layers must be refused before a graph
of them is built. The upper bounds are far above every released model (DeepSeek-V3: 61 layers, 7168 hidden,
256 experts, 129280 vocab) and far below what would exhaust memory while building a graph.
"""
from __future__ import annotations

import math

from dsgraph.errors import ConfigError

# key -> (kind, least, most); None values mean "absent" (the loader's default applies)
_INT, _FLOAT, _BOOL, _STR, _DICT = "int", "float", "bool", "str", "dict"
SCHEMA = {
    "model_type": (_STR, None, None),
    "vocab_size": (_INT, 1, 1 << 22), "hidden_size": (_INT, 1, 1 << 16), "intermediate_size": (_INT, 1, 1 << 20),
    "num_hidden_layers": (_INT, 1, 1024), "num_attention_heads": (_INT, 1, 1024),
    "num_key_value_heads": (_INT, 1, 1024), "max_position_embeddings": (_INT, 1, 1 << 24),
    "rms_norm_eps": (_FLOAT, 0.0, 1.0), "rope_theta": (_FLOAT, 0.0, 1e12),
    "rope_scaling": (_DICT, None, None), "rope_parameters": (_DICT, None, None),
    "tie_word_embeddings": (_BOOL, None, None), "attention_bias": (_BOOL, None, None),
    "qkv_bias": (_BOOL, None, None), "norm_topk_prob": (_BOOL, None, None), "rope_interleave": (_BOOL, None, None),
    "head_dim": (_INT, 1, 4096),
    "n_routed_experts": (_INT, 0, 4096), "n_shared_experts": (_INT, 0, 256), "num_experts_per_tok": (_INT, 1, 4096),
    "moe_intermediate_size": (_INT, 1, 1 << 20), "first_k_dense_replace": (_INT, 0, 1024),
    "moe_layer_freq": (_INT, 1, 1024), "routed_scaling_factor": (_FLOAT, 0.0, 1e4),
    "scoring_func": (_STR, None, None), "topk_method": (_STR, None, None),
    "n_group": (_INT, 1, 4096), "topk_group": (_INT, 1, 4096),
    "q_lora_rank": (_INT, 1, 1 << 16), "kv_lora_rank": (_INT, 1, 1 << 16),
    "qk_nope_head_dim": (_INT, 1, 4096), "qk_rope_head_dim": (_INT, 1, 4096), "v_head_dim": (_INT, 1, 4096),
    "num_nextn_predict_layers": (_INT, 0, 64), "quantization_config": (_DICT, None, None),
}
_ROPE_NUMBERS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                 "low_freq_factor", "high_freq_factor", "rope_theta")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_value(key: str, v, source: str) -> None:
    """One key against its schema entry (None passes: absent)."""
    if v is None or key not in SCHEMA:
        return
    kind, least, most = SCHEMA[key]
    ok = {_INT: isinstance(v, int) and not isinstance(v, bool), _FLOAT: _number(v),
          _BOOL: isinstance(v, bool) or v in (0, 1), _STR: isinstance(v, str), _DICT: isinstance(v, dict)}[kind]
    if not ok:
        raise ConfigError(f"{source}: key {key!r} must be {'an' if kind == _INT else 'a'} {kind}, got {v!r} "
                          f"({type(v).__name__}); fix config.json")
    if least is not None and not (least < v if kind == _FLOAT else least <= v) or most is not None and v > most:
        low = f"> {least}" if kind == _FLOAT else f">= {least}"
        raise ConfigError(f"{source}: key {key!r} = {v!r} is out of range (must be {low} and <= {most}); "
                          "fix config.json")


def check_values(cfg, source: str) -> None:
    """Every schema key of the dict `cfg`, plus the nested rope and quantisation entries."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: a config must be a JSON object, got {type(cfg).__name__}")
    for key, v in cfg.items():
        check_value(key, v, source)
    for key in ("rope_scaling", "rope_parameters"):
        for k, v in (cfg.get(key) or {}).items():
            if k in _ROPE_NUMBERS and v is not None and not _number(v):
                raise ConfigError(f"{source}: {key}.{k} must be a number, got {v!r}; fix config.json")
        kind = (cfg.get(key) or {}).get("rope_type", (cfg.get(key) or {}).get("type", "default"))
        if not isinstance(kind, str):
            raise ConfigError(f"{source}: {key}.rope_type must be a string, got {kind!r}")
    block = (cfg.get("quantization_config") or {}).get("weight_block_size")
    if block is not None and not (isinstance(block, (list, tuple)) and len(block) == 2 and
                                  all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 4096
                                      for b in block)):
        raise ConfigError(f"{source}: quantization_config.weight_block_size must be two integers in [1, 4096], "
                          f"got {block!r}")


def check_consistent(c, source: str) -> None:
    """Relations between keys that the builder relies on (a ModelConfig `c`)."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ConfigError(f"{source}: {what}; fix config.json")
    need(c.num_attention_heads % c.num_key_value_heads == 0,
         f"num_attention_heads={c.num_attention_heads} is not a multiple of num_key_value_heads="
         f"{c.num_key_value_heads}")
    if not c.is_mla:
        need(c.head_dim is not None or c.hidden_size % c.num_attention_heads == 0,
             f"hidden_size={c.hidden_size} is not a multiple of num_attention_heads={c.num_attention_heads}")
        need(c.attn_head_dim % 2 == 0, f"the head dimension {c.attn_head_dim} must be even (rotary pairs)")
    else:
        need(c.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={c.qk_rope_head_dim} must be even (rotary pairs)")
    if c.is_moe:
        need(c.num_experts_per_tok <= c.n_routed_experts,
             f"num_experts_per_tok={c.num_experts_per_tok} exceeds n_routed_experts={c.n_routed_experts}")
        need(c.n_routed_experts % c.n_group == 0 and c.topk_group <= c.n_group,
             f"n_routed_experts={c.n_routed_experts} must split into n_group={c.n_group} groups and topk_group="
             f"{c.topk_group} must be <= n_group")
    if c.rope_scaling:
        need(_number(c.rope_scaling.get("factor")) and c.rope_scaling["factor"] > 0,
             f"rope scaling factor {c.rope_scaling.get('factor')!r} must be a positive number")
