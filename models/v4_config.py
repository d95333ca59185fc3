"""DeepSeek-V4's config: read from config.json in both spellings transformers accepts (`layer_types` /
`mlp_layer_types`, or DeepSeek's legacy `compress_ratios` / `num_hash_layers` / `qk_rope_head_dim`), and the
V4 presets (Flash, Pro, their -base checkpoints, and a tiny one with every layer and MoE kind)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dsgraph.errors import ConfigError

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}


@dataclass
class V4Config:
    vocab_size: int
    hidden_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    n_routed_experts: int
    num_experts_per_tok: int
    layer_types: list
    mlp_layer_types: list
    compress_rates: dict
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.5
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict | None = None          # YaRN of the compressed branches
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 0
    mtp_layer_type: str = SLIDING             # the MTP block's attention (compress_ratios[num_hidden_layers])
    tie_word_embeddings: bool = False
    fp8_block_size: tuple | None = None       # attention / dense weights in FP8 e4m3 blocks
    fp8_scale_fmt: str | None = None
    expert_dtype: str | None = None           # "fp4": MXFP4 routed experts
    model_type: str = "deepseek_v4"
    extra: dict = field(default_factory=dict)

    family = "v4"
    is_mla = False
    is_dsa = False
    is_moe = True

    def layer_type(self, i: int) -> str:
        """Layer i's attention type; i = num_hidden_layers is the MTP block."""
        return self.mtp_layer_type if i >= self.num_hidden_layers else self.layer_types[i]

    def ratio(self, i: int) -> int:
        return self.compress_rates.get(self.layer_type(i), 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fp8_block_size"] = list(self.fp8_block_size) if self.fp8_block_size else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "V4Config":
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if kw.get("fp8_block_size"):
            kw["fp8_block_size"] = tuple(kw["fp8_block_size"])
        return cls(**kw)


def _schedules(cfg: dict, n: int, source: str) -> tuple[list, list, str]:
    """(layer_types, mlp_layer_types, the MTP block's attention type): DeepSeek's compress_ratios list one entry
    past the decoder layers for the MTP block (sliding in the released checkpoints)."""
    types, ratios = cfg.get("layer_types"), cfg.get("compress_ratios") or []
    if types is None and cfg.get("compress_ratios") is not None:
        bad = [r for r in ratios if r not in _RATIO_TO_TYPE]
        if bad:
            raise ConfigError(f"{source}: compress_ratios {bad} not in {sorted(_RATIO_TO_TYPE)}")
        types = [_RATIO_TO_TYPE[r] for r in ratios]
    mtp = cfg.get("mtp_layer_type") or (_RATIO_TO_TYPE.get(ratios[n]) if len(ratios) > n else None) or SLIDING
    if mtp not in (SLIDING, CSA, HCA):
        raise ConfigError(f"{source}: mtp_layer_type {mtp!r} is not one of {(SLIDING, CSA, HCA)}")
    if types is None:   # transformers' default: two HCA layers, then CSA / HCA alternating
        types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    mlp = cfg.get("mlp_layer_types")
    if mlp is None:
        h = cfg.get("num_hash_layers", 3)
        mlp = ["hash_moe"] * min(n, h) + ["moe"] * max(0, n - h)
    types, mlp = list(types[:n]), list(mlp[:n])
    for name, got, ok in (("layer_types", types, (SLIDING, CSA, HCA)), ("mlp_layer_types", mlp, ("hash_moe", "moe"))):
        if len(got) != n or any(t not in ok for t in got):
            raise ConfigError(f"{source}: {name} {got} must list {n} entries from {ok}")
    return types, mlp, mtp


def _compress_rope(cfg: dict) -> tuple[float, dict | None]:
    rp = cfg.get("rope_parameters") or {}
    if isinstance(rp.get("compress"), dict):
        rp = rp["compress"]
    rs = cfg.get("rope_scaling") or {k: v for k, v in rp.items() if k not in ("main", "compress")}
    theta = float(cfg.get("compress_rope_theta") or rp.get("rope_theta") or 160000.0)
    kind = rs.get("rope_type", rs.get("type", "default")) if rs else "default"
    if kind not in ("default", "yarn"):
        raise ConfigError(f"config.json: V4 compressed-branch rope {kind!r} is not supported (default or yarn)")
    return theta, ({**rs, "type": "yarn"} if kind == "yarn" else None)


def from_hf_v4(cfg: dict, source: str = "config.json") -> V4Config:
    """Read a V4 config.json; ConfigError names the missing or bad key."""
    req = ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
           "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok")
    missing = [k for k in req if cfg.get(k) is None]
    if missing:
        raise ConfigError(f"{source}: missing DeepSeek-V4 keys {missing}")
    n, hd = cfg["num_hidden_layers"], cfg["head_dim"]
    types, mlp, mtp_type = _schedules(cfg, n, source)
    rates = {CSA: 4, HCA: 128, **(cfg.get("compress_rates") or {})}
    for k, key in ((CSA, "compress_rate_csa"), (HCA, "compress_rate_hca")):
        rates[k] = cfg.get(key, rates[k])
    rope_dim = cfg.get("qk_rope_head_dim") or int(hd * (cfg.get("partial_rotary_factor") or 64 / 512))
    theta, scaling = _compress_rope(cfg)
    qc = cfg.get("quantization_config") or {}
    if qc and qc.get("quant_method") != "fp8":
        raise ConfigError(f"{source}: quantization_config {qc} is not DeepSeek's FP8 (+ MXFP4 experts)")
    expert_dtype = qc.get("expert_dtype") or cfg.get("expert_dtype")
    if expert_dtype not in (None, "fp8", "fp4"):
        raise ConfigError(f"{source}: expert_dtype {expert_dtype!r} is not fp8 or fp4")
    known = {f for f in V4Config.__dataclass_fields__}
    kw = {k: cfg[k] for k in known & set(cfg) if k not in ("layer_types", "mlp_layer_types", "compress_rates",
                                                           "rope_scaling", "compress_rope_theta", "expert_dtype",
                                                           "qk_rope_head_dim", "model_type", "extra",
                                                           "mtp_layer_type")}
    return V4Config(**kw, layer_types=types, mlp_layer_types=mlp, mtp_layer_type=mtp_type, compress_rates=rates,
                    qk_rope_head_dim=rope_dim,
                    compress_rope_theta=theta, rope_scaling=scaling, expert_dtype=expert_dtype if qc else None,
                    fp8_block_size=tuple(qc.get("weight_block_size") or (128, 128)) if qc else None,
                    fp8_scale_fmt=qc.get("scale_fmt") if qc else None)


_YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}
_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "scale_fmt": "ue8m0",
          "expert_dtype": "fp4"}
_FLASH = {"model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048,
          "num_hidden_layers": 43, "num_attention_heads": 64, "head_dim": 512, "qk_rope_head_dim": 64,
          "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024, "n_routed_experts": 256, "n_shared_experts": 1,
          "num_experts_per_tok": 6, "routed_scaling_factor": 1.5, "sliding_window": 128, "index_n_heads": 64,
          "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "num_hash_layers": 3,
          "swiglu_limit": 10.0, "rope_theta": 10000.0, "compress_rope_theta": 160000.0, "rope_scaling": _YARN,
          "max_position_embeddings": 1048576, "num_nextn_predict_layers": 1, "quantization_config": _QUANT}
_PRO = {**_FLASH, "hidden_size": 7168, "moe_intermediate_size": 3072, "num_hidden_layers": 61,
        "num_attention_heads": 128, "q_lora_rank": 1536, "o_groups": 16, "n_routed_experts": 384}
V4_PRESETS = {"deepseek-v4-flash": _FLASH, "deepseek-v4-flash-base": _FLASH, "deepseek-v4-pro": _PRO,
              "deepseek-v4-pro-base": _PRO}
# every attention type and both MoE kinds; window 8, CSA groups of 4, HCA groups of 8, top-2 of the CSA entries,
# so 20-token prompts exceed the window, close several groups of each kind and make the top-k choose; the MTP
# block as released (sliding attention, score-routed MoE)
V4_TINY = {"deepseek-v4-tiny": {
    **_FLASH, "vocab_size": 128, "hidden_size": 32, "moe_intermediate_size": 32, "num_hidden_layers": 4,
    "num_attention_heads": 4, "head_dim": 32, "qk_rope_head_dim": 8, "q_lora_rank": 16, "o_groups": 2,
    "o_lora_rank": 16, "n_routed_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8, "index_n_heads": 8,
    "index_head_dim": 16, "index_topk": 2, "hc_mult": 4, "num_hash_layers": 2, "swiglu_limit": 0.5,
    "layer_types": [SLIDING, CSA, HCA, CSA], "compress_rates": {CSA: 4, HCA: 8}, "max_position_embeddings": 512,
    "rope_scaling": {**_YARN, "factor": 4, "original_max_position_embeddings": 32}, "quantization_config": None,
    "num_nextn_predict_layers": 1}}
