"""DeepSeekMoE 16B (`model_type: "deepseek"`) has no transformers class: a tiny checkpoint in the hub layout
is checked against an independent torch reference written here from DeepSeek's modeling_deepseek.py --
LLaMA attention (half-split rope), the naive per-expert MoE loop, softmax top-k without renormalisation,
shared experts, dense layers before `first_k_dense_replace` and every `moe_layer_freq`-th layer MoE.
"""
from __future__ import annotations

import json

import hf_fixtures as fx
import pytest
import torch
import torch.nn.functional as F

import dsgraph

_one_thread = pytest.fixture(scope="module", autouse=True)(fx.one_thread)

CONFIG = {"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "vocab_size": 256, "hidden_size": 64,
          "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 4, "n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 3,
          "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax",
          "aux_loss_alpha": 0.001, "seq_aux": True, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
          "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": False,
          "torch_dtype": "bfloat16"}


def is_moe(cfg, i):
    return i >= cfg["first_k_dense_replace"] and i % cfg["moe_layer_freq"] == 0


def hub_tensors(cfg, seed):
    """Random weights keyed as deepseek-ai/deepseek-moe-16b-base stores them, in bf16 as the hub does."""
    g = torch.Generator().manual_seed(seed)
    d, v, e = cfg["hidden_size"], cfg["vocab_size"], cfg["n_routed_experts"]

    def lin(o, i):
        return torch.randn(o, i, generator=g) / i ** 0.5

    def norm(n):
        return 1 + 0.1 * torch.randn(n, generator=g)

    def mlp(p, inter):
        return {f"{p}.gate_proj.weight": lin(inter, d), f"{p}.up_proj.weight": lin(inter, d),
                f"{p}.down_proj.weight": lin(d, inter)}

    t = {"model.embed_tokens.weight": torch.randn(v, d, generator=g), "model.norm.weight": norm(d),
         "lm_head.weight": lin(v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t.update({f"{p}.input_layernorm.weight": norm(d), f"{p}.post_attention_layernorm.weight": norm(d)})
        t.update({f"{p}.self_attn.{n}_proj.weight": lin(d, d) for n in "qkvo"})
        if is_moe(cfg, i):
            t[f"{p}.mlp.gate.weight"] = lin(e, d)
            for j in range(e):
                t.update(mlp(f"{p}.mlp.experts.{j}", cfg["moe_intermediate_size"]))
            t.update(mlp(f"{p}.mlp.shared_experts", cfg["moe_intermediate_size"] * cfg["n_shared_experts"]))
        else:
            t.update(mlp(f"{p}.mlp", cfg["intermediate_size"]))
    return {k: x.to(torch.bfloat16) for k, x in t.items()}


class Reference:
    """modeling_deepseek.py's forward, plainly, in fp32 (full recompute, no cache)."""

    def __init__(self, cfg, tensors):
        self.cfg, self.w = cfg, {k: x.float() for k, x in tensors.items()}

    def rms(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"]) * self.w[name]

    def mlp(self, x, p):
        w = self.w
        return F.linear(F.silu(F.linear(x, w[f"{p}.gate_proj.weight"])) * F.linear(x, w[f"{p}.up_proj.weight"]),
                        w[f"{p}.down_proj.weight"])

    def attention(self, x, p):
        b, s, d = x.shape
        h = self.cfg["num_attention_heads"]
        hd = d // h
        q, k, v = (F.linear(x, self.w[f"{p}.{n}_proj.weight"]).view(b, s, h, hd).transpose(1, 2) for n in "qkv")
        inv = 1.0 / self.cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
        ang = torch.arange(s).float()[:, None] * inv
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def rot(t):
            t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
            return t * cos + torch.cat([-t2, t1], -1) * sin
        att = rot(q) @ rot(k).transpose(-1, -2) / hd ** 0.5
        att = att.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return F.linear((att @ v).transpose(1, 2).reshape(b, s, d), self.w[f"{p}.o_proj.weight"])

    def moe(self, x, p):
        cfg = self.cfg
        xf = x.reshape(-1, x.shape[-1])
        scores = F.linear(xf, self.w[f"{p}.gate.weight"]).softmax(-1)
        weight, idx = scores.topk(cfg["num_experts_per_tok"], dim=-1, sorted=False)   # no renormalisation
        y = torch.zeros_like(xf)
        for e in range(cfg["n_routed_experts"]):
            tok, slot = torch.where(idx == e)
            if len(tok):
                y.index_add_(0, tok, self.mlp(xf[tok], f"{p}.experts.{e}") * weight[tok, slot, None])
        return (y + self.mlp(xf, f"{p}.shared_experts")).view(x.shape)

    def __call__(self, ids):
        h = F.embedding(ids, self.w["model.embed_tokens.weight"])
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{i}"
            h = h + self.attention(self.rms(h, f"{p}.input_layernorm.weight"), f"{p}.self_attn")
            x = self.rms(h, f"{p}.post_attention_layernorm.weight")
            h = h + (self.moe(x, f"{p}.mlp") if is_moe(self.cfg, i) else self.mlp(x, f"{p}.mlp"))
        return F.linear(self.rms(h, "model.norm.weight"), self.w["lm_head.weight"])


@pytest.fixture(scope="module", params=[1, 2], ids=["moe_every_layer", "moe_layer_freq_2"])
def ckpt(request, tmp_path_factory):
    cfg = {**CONFIG, "moe_layer_freq": request.param}
    path = tmp_path_factory.mktemp(f"moe16b_freq{request.param}")
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = hub_tensors(cfg, seed=request.param)
    fx.write_tensors(path, tensors, shards=2)
    return path, Reference(cfg, tensors)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_layer_pattern(ckpt):
    path, ref = ckpt
    moe_layers = sorted({n.name.split(".")[2] for n in dsgraph.load(str(path)).graph.params().values()
                         if ".experts." in n.name})
    assert moe_layers == [str(i) for i in range(4) if is_moe(ref.cfg, i)]


def test_logits_match_reference(ckpt):
    path, ref = ckpt
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    exe = dsgraph.compile(dsgraph.load(str(path)), backend="eager")
    assert _rel(exe(ids), ref(ids)) < 1e-4


def test_greedy_and_cached_decode_match_reference(ckpt):
    path, ref = ckpt
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    exe = dsgraph.compile(dsgraph.load(str(path)), backend="eager")
    new = exe.generate(prompt, max_new_tokens=16)
    seq = prompt
    for _ in range(16):   # the reference's own greedy loop, full recompute every token
        seq = torch.cat([seq, ref(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(new, seq[:, 5:])
    full = exe(seq)
    _, state = exe.prefill(seq[:, :5])
    step, _ = exe.decode(seq[:, 5:9], state)
    assert _rel(step, full[:, 5:9]) < 1e-5


def test_renormalising_topk_would_be_caught(ckpt):
    """DeepSeekMoE keeps the raw softmax gates; renormalising them (V3 style) must break parity."""
    path, ref = ckpt
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    model = dsgraph.load(str(path))
    for n in model.graph.nodes:
        if n.op == "moe.route":
            n.attrs["norm_topk_prob"] = True
    assert _rel(dsgraph.compile(model, backend="eager")(ids), ref(ids)) > 1e-3
