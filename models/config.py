"""ModelConfig: one config object for every DeepSeek-family shape, read from the
Hugging Face `config.json` spelling (both `rope_scaling` and transformers-5
`rope_parameters`), validated with errors that name the missing or bad key."""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

from dsgraph.errors import ConfigError

from .config_schema import check_consistent, check_values

FAMILIES = {
    # model_type -> family builder shape
    "llama": "llama", "qwen2": "llama", "deepseek": "deepseek_moe",
    "deepseek_v2": "mla", "deepseek_v3": "mla", "deepseek_v32": "mla",
}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False          # LLaMA: bias on q/k/v/o
    qkv_bias: bool = False                # Qwen2: bias on q/k/v only
    head_dim: int | None = None
    # DeepSeekMoE
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    # MLA
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool = True
    # MTP and quantisation
    num_nextn_predict_layers: int = 0
    fp8_block_size: tuple | None = None   # (128, 128) for FP8 block-quantised checkpoints
    fp8_scale_fmt: str | None = None      # "ue8m0" (V3.1 / V3.2): block scales are powers of two
    # DeepSeek Sparse Attention (V3.2): the lightning indexer's heads, head dim and top-k (models/dsa.py)
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    extra: dict = field(default_factory=dict)

    # derived -----------------------------------------------------------------
    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def is_mla(self) -> bool:
        return self.family == "mla"

    @property
    def is_dsa(self) -> bool:
        return bool(self.index_topk)

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        return self.is_moe and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fp8_block_size"] = list(self.fp8_block_size) if self.fp8_block_size else None
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "model config") -> "ModelConfig":
        """The config `to_dict` wrote (an artifact's manifest, a saved graph's meta), checked like config.json."""
        check_values(d, source)
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("model_type") not in FAMILIES:
            raise ConfigError(f"{source}: model_type {kw.get('model_type')!r} is not one of {sorted(FAMILIES)}")
        block = kw.get("fp8_block_size")
        if block:
            check_values({"quantization_config": {"weight_block_size": block}}, source)
            kw["fp8_block_size"] = tuple(block)
        if not isinstance(kw.get("extra", {}), dict):
            raise ConfigError(f"{source}: key 'extra' must be an object")
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
                         and kw.get(f.name) is None)
        if missing:
            raise ConfigError(f"{source}: missing keys {missing}")
        out = cls(**kw)
        check_consistent(out, source)
        return out


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_MLA_REQUIRED = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_MOE_REQUIRED = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")


# transformers' DeepseekV3 hard-codes sigmoid + noaux_tc routing and writes no such keys to config.json
_TYPE_DEFAULTS = {"deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc"},
                  "deepseek_v32": {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}}
_DSA_REQUIRED = ("index_n_heads", "index_head_dim", "index_topk", "q_lora_rank")


def from_hf(cfg: dict, source: str = "config.json") -> ModelConfig:
    """Read a Hugging Face config dict; raise ConfigError naming the key and the fix (types, ranges and the
    relations between keys: config_schema.py)."""
    check_values(cfg, source)
    cfg = {**_TYPE_DEFAULTS.get(cfg.get("model_type"), {}), **cfg}
    mt = cfg.get("model_type")
    if mt is None:
        raise ConfigError(f"{source}: missing key 'model_type'; expected one of {sorted(FAMILIES)}")
    if mt not in FAMILIES:
        raise ConfigError(f"{source}: unknown model_type {mt!r}; dsgraph builds {sorted(FAMILIES)}")
    for key in _REQUIRED:
        if cfg.get(key) is None:
            raise ConfigError(f"{source}: missing key {key!r} (needed for {mt})")
    if FAMILIES[mt] == "mla":
        for key in _MLA_REQUIRED:
            if cfg.get(key) is None:
                raise ConfigError(f"{source}: missing MLA key {key!r} for {mt}")
    if mt == "deepseek_v32":
        for key in _DSA_REQUIRED:
            if not cfg.get(key):
                raise ConfigError(f"{source}: missing DeepSeek Sparse Attention key {key!r} for {mt}")
    if mt in ("deepseek", "deepseek_v2", "deepseek_v3", "deepseek_v32"):
        for key in _MOE_REQUIRED:
            if cfg.get(key) is None:
                raise ConfigError(f"{source}: missing MoE key {key!r} for {mt}")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    theta = cfg.get("rope_theta")
    if isinstance(rope, dict):
        rope = dict(rope)
        theta = theta or rope.get("rope_theta")
        kind = rope.get("rope_type", rope.get("type", "default"))
        rope = None if kind == "default" else {**rope, "type": kind}
        if rope is not None and kind not in ("linear", "yarn", "llama3"):
            raise ConfigError(f"{source}: rope scaling type {kind!r} is not supported; "
                              "dsgraph supports default, linear, yarn, llama3")
        if rope is not None and "factor" not in rope:
            raise ConfigError(f"{source}: rope scaling {kind!r} is missing key 'factor'")
    topk_method = cfg.get("topk_method", "greedy")
    methods = {"greedy": "greedy", "group_limited_greedy": "group_limited", "noaux_tc": "noaux_tc"}
    if topk_method not in methods:
        raise ConfigError(f"{source}: topk_method {topk_method!r} not in {sorted(methods)}")
    qc = cfg.get("quantization_config") or {}
    fp8 = None
    if qc:
        if qc.get("quant_method") != "fp8" or qc.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"{source}: quantization_config {qc} is not FP8 e4m3 block quantisation")
        if qc.get("scale_fmt") not in (None, "ue8m0"):
            raise ConfigError(f"{source}: quantization_config scale_fmt {qc['scale_fmt']!r} is not supported; "
                              "dsgraph reads float block scales (no scale_fmt) and power-of-two 'ue8m0' ones")
        fp8 = tuple(qc.get("weight_block_size") or (128, 128))
    n_heads = cfg["num_attention_heads"]
    out = ModelConfig(
        model_type=mt, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=n_heads, num_key_value_heads=cfg.get("num_key_value_heads") or n_heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta or 10000.0), rope_scaling=rope,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)) and mt == "llama",
        qkv_bias=mt == "qwen2", head_dim=cfg.get("head_dim") if mt in ("llama", "qwen2") else None,
        n_routed_experts=cfg.get("n_routed_experts"), n_shared_experts=cfg.get("n_shared_experts") or 0,
        num_experts_per_tok=cfg.get("num_experts_per_tok"), moe_intermediate_size=cfg.get("moe_intermediate_size"),
        first_k_dense_replace=cfg.get("first_k_dense_replace", 0) or 0,
        moe_layer_freq=cfg.get("moe_layer_freq", 1) or 1,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0) or 1.0),
        scoring_func=cfg.get("scoring_func", "softmax"), topk_method=methods[topk_method],
        n_group=cfg.get("n_group") or 1, topk_group=cfg.get("topk_group") or 1,
        q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=cfg.get("kv_lora_rank"),
        qk_nope_head_dim=cfg.get("qk_nope_head_dim"), qk_rope_head_dim=cfg.get("qk_rope_head_dim"),
        v_head_dim=cfg.get("v_head_dim"), rope_interleave=bool(cfg.get("rope_interleave", True)),
        num_nextn_predict_layers=cfg.get("num_nextn_predict_layers", 0) or 0, fp8_block_size=fp8,
        fp8_scale_fmt=qc.get("scale_fmt") if fp8 else None,
        **({k: cfg[k] for k in _DSA_REQUIRED[:3]} if mt == "deepseek_v32" else {}),
    )
    if out.scoring_func not in ("softmax", "sigmoid"):
        raise ConfigError(f"{source}: scoring_func {out.scoring_func!r} not in ['sigmoid', 'softmax']")
    if mt == "deepseek_v2":
        # transformers' DeepseekV2 ignores norm_topk_prob; the released V2 configs set it false
        out.norm_topk_prob = False
    check_consistent(out, source)
    return out


def rope_attrs(cfg: ModelConfig) -> dict:
    """The `rope` op attributes for this config."""
    attrs = {"theta": cfg.rope_theta, "interleaved": cfg.is_mla and cfg.rope_interleave}
    rs = cfg.rope_scaling
    if rs:
        kind = rs["type"]
        attrs.update(scaling=kind, factor=float(rs["factor"]))
        if kind in ("yarn", "llama3"):
            attrs["original_max_position_embeddings"] = int(
                rs.get("original_max_position_embeddings") or cfg.max_position_embeddings)
        if kind == "yarn":
            attrs.update(beta_fast=float(rs.get("beta_fast") or 32), beta_slow=float(rs.get("beta_slow") or 1),
                         mscale=float(rs.get("mscale") or 0.0), mscale_all_dim=float(rs.get("mscale_all_dim") or 0.0))
        if kind == "llama3":
            attrs.update(low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                         high_freq_factor=float(rs.get("high_freq_factor", 4.0)))
    return attrs
