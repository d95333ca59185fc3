"""DeepSeek-V3's MTP branch against an independent torch implementation of its formula.

The checkpoint is a tiny transformers DeepseekV3 model written in the hub layout with FP8 block weights
and a random MTP layer at index `num_hidden_layers` (transformers ignores that layer). The reference reads
the layer's tensors straight from the safetensors files, dequantises them itself, and computes

    h_t      = main model hidden state after the last block (before the final norm), from transformers
    x        = eh_proj(concat[enorm(embed(token t+1)), hnorm(h_t)])
    x        = one full decoder block (transformers' DeepseekV3DecoderLayer with the MTP layer's weights)
    logits   = shared_head.head(shared_head.norm(x))       -> the prediction of token t+2
"""
from __future__ import annotations

import hf_fixtures as fx
import pytest
import torch
import torch.nn.functional as F

import dsgraph

_one_thread = pytest.fixture(scope="module", autouse=True)(fx.one_thread)
S = 9


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _dequant(q, s, block):
    bn, bk = block
    rows = torch.arange(q.shape[0]) // bn
    cols = torch.arange(q.shape[1]) // bk
    return q.float() * s[rows][:, cols]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3mtp")
    block = (16, 16)
    hf = fx.hf_model(fx.tiny_config("v3"), seed=7)
    fx.fp8_roundtrip_(hf, block)
    hf.save_pretrained(path)
    fx.add_tensors(path, fx.mtp_layer_tensors(hf.config, seed=8))
    fx.edit_config(path, lambda c: {**c, "num_nextn_predict_layers": 1})
    fx.quantize_checkpoint_fp8(path, block, shards=2)
    return path, hf, block


def reference_mtp(path, hf, block, ids, nxt):
    """MTP logits [B, S, V] for tokens `ids` with next tokens `nxt`, from the formula."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer
    cfg = hf.config
    L, eps = cfg.num_hidden_layers, cfg.rms_norm_eps
    raw = {k[len(f"model.layers.{L}."):]: t for k, t in fx.read_tensors(path).items()
           if k.startswith(f"model.layers.{L}.") and not k.endswith("_scale_inv")}
    scales = {k[len(f"model.layers.{L}."):]: t for k, t in fx.read_tensors(path).items()
              if k.startswith(f"model.layers.{L}.") and k.endswith("_scale_inv")}
    w = {k: _dequant(t, scales[k + "_scale_inv"], block) if k + "_scale_inv" in scales else t.float()
         for k, t in raw.items()}
    assert any(t.dtype == torch.float8_e4m3fn for t in raw.values())   # the MTP block is FP8 in the hub too
    captured = {}
    hook = hf.model.layers[L - 1].register_forward_hook(lambda m, a, out: captured.update(h=out))
    with torch.no_grad():
        hf(ids)
    hook.remove()
    h = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]

    layer = DeepseekV3DecoderLayer(cfg, layer_idx=L).eval()
    e = cfg.n_routed_experts
    block_sd = {k: v for k, v in w.items() if not k.startswith(("embed_tokens", "enorm", "hnorm", "eh_proj",
                                                                 "shared_head")) and ".experts." not in k}
    block_sd["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([w[f"mlp.experts.{j}.gate_proj.weight"], w[f"mlp.experts.{j}.up_proj.weight"]]) for j in range(e)])
    block_sd["mlp.experts.down_proj"] = torch.stack([w[f"mlp.experts.{j}.down_proj.weight"] for j in range(e)])
    layer.load_state_dict(block_sd, strict=True)

    with torch.no_grad():
        emb = F.embedding(nxt, w["embed_tokens.weight"])
        x = F.linear(torch.cat([_rms(emb, w["enorm.weight"], eps), _rms(h, w["hnorm.weight"], eps)], -1),
                     w["eh_proj.weight"])
        pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        rope = hf.model.rotary_emb(x, pos)
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
        x = layer(x, attention_mask=mask, position_embeddings=rope, position_ids=pos)
        x = x[0] if isinstance(x, tuple) else x
        return F.linear(_rms(x, w["shared_head.norm.weight"], eps), w["shared_head.head.weight"])


def run_mtp(model, ids, nxt, caches=None, start=0):
    """One step of the whole graph (main model + MTP branch) in the interpreter; returns (outputs, next caches)."""
    g = model.graph
    b, s = ids.shape
    if caches is None:
        caches = {n: torch.zeros(v.type.concrete({"B": b, "T": 0})) for n, v in g.inputs.items() if v.kind == "cache"}
    pos = torch.arange(start, start + s)[None].expand(b, s)
    out = dsgraph.Interpreter(g, model.weights).run({"input_ids": ids, "positions": pos, "mtp_ids": nxt, **caches})
    return out, {n: out[g.cache_map[n]] for n in caches}


def _tokens(seed, shape=(2, S + 1)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def test_mtp_logits_match_the_formula(ckpt):
    path, hf, block = ckpt
    seq = _tokens(0)
    ids, nxt = seq[:, :-1], seq[:, 1:]
    ref = reference_mtp(path, hf, block, ids, nxt)
    model = dsgraph.load(str(path))
    assert "mtp_ids" in model.graph.inputs
    out, _ = run_mtp(model, ids, nxt)
    assert float((out["mtp_logits"] - ref).norm() / ref.norm()) < 1e-4
    with torch.no_grad():
        main = hf(ids).logits
    assert float((out["logits"] - main).norm() / main.norm()) < 1e-4   # the main head is untouched by MTP


def test_mtp_with_cache_equals_full_recompute(ckpt):
    path, _, _ = ckpt
    model = dsgraph.load(str(path))
    seq = _tokens(1)
    ids, nxt = seq[:, :-1], seq[:, 1:]
    full, _ = run_mtp(model, ids, nxt)
    first, caches = run_mtp(model, ids[:, :6], nxt[:, :6])
    rest, caches = run_mtp(model, ids[:, 6:], nxt[:, 6:], caches, start=6)
    got = torch.cat([first["mtp_logits"], rest["mtp_logits"]], 1)
    assert float((got - full["mtp_logits"]).norm() / full["mtp_logits"].norm()) < 1e-5
    assert caches["cache.mtp.k"].shape[1] == S


def test_mtp_branch_is_sensitive_to_its_weights(ckpt):
    """The comparison above can fail: a changed hnorm (the hidden-state half of the input) moves the logits."""
    path, hf, block = ckpt
    seq = _tokens(2)
    ids, nxt = seq[:, :-1], seq[:, 1:]
    ref = reference_mtp(path, hf, block, ids, nxt)
    model = dsgraph.load(str(path))
    name = "model.layers.3.hnorm.weight"
    model.weights.set(name, model.weights[name] * 0.5)
    out, _ = run_mtp(model, ids, nxt)
    assert float((out["mtp_logits"] - ref).norm() / ref.norm()) > 1e-3
