"""An independent torch reference of DeepSeek-VL2, written from the published architecture (DeepSeek's
deepseek_vl2/models: processing_deepseek_vl_v2.py, siglip_vit.py, modeling_deepseek_vl_v2.py,
modeling_deepseek.py), and a writer of tiny checkpoints in DeepSeek's hub layout. No dsgraph code is used here.

  * tiling: ImageOps.pad (bicubic fit, centred on the mean colour) for the global view and the best candidate
    resolution, local tiles cropped row-major, ToTensor + Normalize;
  * vision: timm ViT (conv patches, learned positions, fused qkv, tanh GELU MLP, LayerNorm 1e-6, final norm);
  * projector: zero-pad the grid to even, F.unfold 2x2 (channel-major), Linear / GELU / Linear;
  * layout: global [h, w] rows + newline, the view separator, local tiles rearranged to (th h) x (tw w) rows +
    newline, masked-scattered over the `<image>` positions;
  * language: DeepSeek-V2 MLA (q_lora optional, interleaved rope permuted to half-split) or LLaMA attention
    (`use_mla: false`), MoEGate (softmax greedy or sigmoid noaux_tc with bias, norm_topk_prob, routed scaling),
    the naive per-expert loop, shared experts.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dsgraph.models.tiny_tokenizer import tiny_tokenizer_files
from safetensors.torch import save_file
from tokenizers import Tokenizer

TILE, PATCH = 44, 14   # 3 patches per side, 2 pixels the conv drops (as 384 / 14); the shuffle pads 3 -> 4
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
CANDIDATES = [[44, 44], [88, 44], [44, 88], [88, 88]]
_LM = {"vocab_size": 257, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
       "n_shared_experts": 2, "num_experts_per_tok": 3, "first_k_dense_replace": 1, "moe_layer_freq": 1,
       "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512, "bos_token_id": 0,
       "eos_token_id": 1, "model_type": "deepseek_v2"}
LANGUAGE = {   # VL2-Tiny's shape (MHA, greedy softmax) and VL2's (MLA with q_lora, sigmoid noaux_tc, renormalised)
    "mha": {**_LM, "use_mla": False, "kv_lora_rank": None, "q_lora_rank": None, "qk_nope_head_dim": 0,
            "qk_rope_head_dim": 0, "v_head_dim": 0, "topk_method": "greedy", "scoring_func": "softmax",
            "norm_topk_prob": False, "routed_scaling_factor": 1.0},
    "mla": {**_LM, "use_mla": True, "kv_lora_rank": 32, "q_lora_rank": 24, "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8, "v_head_dim": 16, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
            "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.0},
}


def config(attention: str) -> dict:
    return {"model_type": "deepseek_vl_v2", "tile_tag": "2D", "global_view_pos": "head",
            "candidate_resolutions": CANDIDATES,
            "vision_config": {"model_type": "vision", "model_name": "siglip_so400m_patch14_384", "image_size": TILE,
                              "patch_size": PATCH, "width": 32, "layers": 2, "heads": 2, "mlp_ratio": 2.0,
                              "global_pool": "map", "ignore_head": True, "class_token": False, "weight_init": "skip"},
            "projector_config": {"model_type": "mlp_projector", "projector_type": "downsample_mlp_gelu",
                                 "input_dim": 32, "n_embed": 64, "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2},
            "language_config": LANGUAGE[attention], "torch_dtype": "bfloat16"}


def hub_tensors(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights keyed as DeepSeek ships VL2 (bf16), with the unused attention-pooling head."""
    g = torch.Generator().manual_seed(seed)
    vc, lc = cfg["vision_config"], cfg["language_config"]
    w, d, e = vc["width"], lc["hidden_size"], lc["n_routed_experts"]

    def lin(o, i, bias=False, p=""):
        t = {f"{p}.weight": torch.randn(o, i, generator=g) / i ** 0.5}
        return {**t, f"{p}.bias": 0.1 * torch.randn(o, generator=g)} if bias else t

    def norm(n, p, bias=False):
        t = {f"{p}.weight": 1 + 0.1 * torch.randn(n, generator=g)}
        return {**t, f"{p}.bias": 0.1 * torch.randn(n, generator=g)} if bias else t

    def swiglu(p, inter):
        return {**lin(inter, d, p=f"{p}.gate_proj"), **lin(inter, d, p=f"{p}.up_proj"),
                **lin(d, inter, p=f"{p}.down_proj")}

    grid, mlp = (TILE // PATCH) ** 2, int(w * vc["mlp_ratio"])
    t = {"vision.patch_embed.proj.weight": torch.randn(w, 3, PATCH, PATCH, generator=g) / (3 * PATCH * PATCH) ** 0.5,
         "vision.patch_embed.proj.bias": 0.1 * torch.randn(w, generator=g),
         "vision.pos_embed": 0.5 * torch.randn(1, grid, w, generator=g), **norm(w, "vision.norm", True),
         "vision.attn_pool.latent": torch.randn(1, 1, w, generator=g), **lin(w, w, True, "vision.attn_pool.q"),
         **lin(64, 4 * w, True, "projector.layers.0"), **lin(64, 64, True, "projector.layers.2"),
         "image_newline": torch.randn(d, generator=g), "view_seperator": torch.randn(d, generator=g),
         "language.model.embed_tokens.weight": torch.randn(lc["vocab_size"], d, generator=g),
         **norm(d, "language.model.norm"), **lin(lc["vocab_size"], d, p="language.lm_head")}
    for i in range(vc["layers"]):
        p = f"vision.blocks.{i}"
        t.update({**norm(w, f"{p}.norm1", True), **norm(w, f"{p}.norm2", True), **lin(3 * w, w, True, f"{p}.attn.qkv"),
                  **lin(w, w, True, f"{p}.attn.proj"), **lin(mlp, w, True, f"{p}.mlp.fc1"),
                  **lin(w, mlp, True, f"{p}.mlp.fc2")})
    h = lc["num_attention_heads"]
    for i in range(lc["num_hidden_layers"]):
        p = f"language.model.layers.{i}"
        t.update({**norm(d, f"{p}.input_layernorm"), **norm(d, f"{p}.post_attention_layernorm")})
        a = f"{p}.self_attn"
        if lc["use_mla"]:
            qd, r = lc["qk_nope_head_dim"] + lc["qk_rope_head_dim"], lc["kv_lora_rank"]
            t.update({**lin(lc["q_lora_rank"], d, p=f"{a}.q_a_proj"), **norm(lc["q_lora_rank"], f"{a}.q_a_layernorm"),
                      **lin(h * qd, lc["q_lora_rank"], p=f"{a}.q_b_proj"), **norm(r, f"{a}.kv_a_layernorm"),
                      **lin(r + lc["qk_rope_head_dim"], d, p=f"{a}.kv_a_proj_with_mqa"),
                      **lin(h * (lc["qk_nope_head_dim"] + lc["v_head_dim"]), r, p=f"{a}.kv_b_proj"),
                      **lin(d, h * lc["v_head_dim"], p=f"{a}.o_proj")})
        else:
            t.update({k: v for n in "qkvo" for k, v in lin(d, d, p=f"{a}.{n}_proj").items()})
        if i >= lc["first_k_dense_replace"]:
            t[f"{p}.mlp.gate.weight"] = torch.randn(e, d, generator=g) / d ** 0.5
            if lc["topk_method"] == "noaux_tc":
                t[f"{p}.mlp.gate.e_score_correction_bias"] = 0.1 * torch.randn(e, generator=g)
            for j in range(e):
                t.update(swiglu(f"{p}.mlp.experts.{j}", lc["moe_intermediate_size"]))
            t.update(swiglu(f"{p}.mlp.shared_experts", lc["moe_intermediate_size"] * lc["n_shared_experts"]))
        else:
            t.update(swiglu(f"{p}.mlp", lc["intermediate_size"]))
    return {k: v.to(torch.bfloat16) for k, v in t.items()}


def write_checkpoint(path: Path, attention: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """config.json, processor_config.json, model.safetensors and a tokenizer holding `<image>` (id 256)."""
    cfg = config(attention)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "processor_config.json").write_text(json.dumps({
        "candidate_resolutions": CANDIDATES, "patch_size": PATCH, "downsample_ratio": 2, "image_mean": MEAN,
        "image_std": STD, "normalize": True, "image_token": "<image>", "processor_class": "DeepseekVLV2Processor"}))
    files = tiny_tokenizer_files()
    tok = Tokenizer.from_str(files["tokenizer.json"])
    tok.add_special_tokens(["<image>"])
    (path / "tokenizer.json").write_text(tok.to_str())
    (path / "tokenizer_config.json").write_text(files["tokenizer_config.json"])
    tensors = hub_tensors(cfg, seed)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return tensors


# ------------------------------------------------------------------------------------------------ tiling
def best_resolution(width, height, candidates):
    best, most, least = None, 0, float("inf")
    for cw, ch in candidates:
        s = min(cw / width, ch / height)
        effective = min(int(width * s) * int(height * s), width * height)
        if effective > most or (effective == most and cw * ch - effective < least):
            best, most, least = (cw, ch), effective, cw * ch - effective
    return best


def tiles(image, crop=True, mean=MEAN, std=STD, tile=TILE, candidates=CANDIDATES):
    """(tiles [1 + w*h, 3, tile, tile], [w, h]) of one PIL image, as DeepSeek's processor makes them."""
    from PIL import ImageOps
    bw, bh = best_resolution(*image.size, candidates) if crop else (tile, tile)
    colour = tuple(int(m * 255) for m in mean)
    views = [ImageOps.pad(image, (tile, tile), color=colour)]
    local = ImageOps.pad(image, (bw, bh), color=colour)
    views += [local.crop((x, y, x + tile, y + tile)) for y in range(0, bh, tile) for x in range(0, bw, tile)]
    arr = torch.from_numpy(np.stack([np.asarray(v) for v in views])).permute(0, 3, 1, 2).float() / 255
    return (arr - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None], [bw // tile, bh // tile]


def image_token_count(w, h, side):
    return side * (side + 1) + 1 + h * side * (w * side + 1)


# ------------------------------------------------------------------------------------------------ the model
def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, positions, theta, interleaved):
    """Half-split rotary embedding; DeepSeek-V2's MLA first permutes interleaved pairs into halves."""
    d = x.shape[-1]
    if interleaved:
        x = x.view(*x.shape[:-1], d // 2, 2).transpose(-1, -2).reshape(x.shape)
    ang = positions.float()[:, None] / theta ** (torch.arange(0, d, 2).float() / d)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


class Reference:
    def __init__(self, cfg: dict, tensors: dict[str, torch.Tensor]):
        self.cfg, self.lc, self.w = cfg, cfg["language_config"], {k: v.float() for k, v in tensors.items()}

    def lin(self, x, p, bias=True):
        return F.linear(x, self.w[f"{p}.weight"], self.w.get(f"{p}.bias") if bias else None)

    def vision(self, px):
        w, heads = self.cfg["vision_config"]["width"], self.cfg["vision_config"]["heads"]
        x = F.conv2d(px, self.w["vision.patch_embed.proj.weight"], self.w["vision.patch_embed.proj.bias"], stride=PATCH)
        x = x.flatten(2).transpose(1, 2) + self.w["vision.pos_embed"]
        b, n, _ = x.shape
        for i in range(self.cfg["vision_config"]["layers"]):
            p = f"vision.blocks.{i}"
            y = F.layer_norm(x, (w,), self.w[f"{p}.norm1.weight"], self.w[f"{p}.norm1.bias"], 1e-6)
            q, k, v = self.lin(y, f"{p}.attn.qkv").reshape(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
            att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
            x = x + self.lin(att, f"{p}.attn.proj")
            y = F.layer_norm(x, (w,), self.w[f"{p}.norm2.weight"], self.w[f"{p}.norm2.bias"], 1e-6)
            x = x + self.lin(F.gelu(self.lin(y, f"{p}.mlp.fc1"), approximate="tanh"), f"{p}.mlp.fc2")
        return F.layer_norm(x, (w,), self.w["vision.norm.weight"], self.w["vision.norm.bias"], 1e-6)

    def projector(self, x):
        b, hw, c = x.shape
        side = int(hw ** 0.5)
        grid = F.pad(x.reshape(b, side, side, c), (0, 0, 0, side % 2, 0, side % 2)).permute(0, 3, 1, 2)
        x = F.unfold(grid, kernel_size=2, stride=2).permute(0, 2, 1)
        return self.lin(F.gelu(self.lin(x, "projector.layers.0")), "projector.layers.2")

    def embeds(self, ids, pixels=None, crops=(), image_token=256):
        """Token embeddings with the images' tokens formatted as DeepSeek's prepare_inputs_embeds does."""
        e = F.embedding(ids, self.w["language.model.embed_tokens.weight"])
        if pixels is None:
            return e
        feats = self.projector(self.vision(pixels))
        _, hw, d = feats.shape
        h = w = int(hw ** 0.5)
        nl, sep, out, t = self.w["image_newline"], self.w["view_seperator"], [], 0
        for tw, th in crops:
            glob = torch.cat([feats[t].view(h, w, d), nl.expand(h, 1, d)], 1).reshape(-1, d)
            loc = feats[t + 1:t + 1 + tw * th].view(th, tw, h, w, d).permute(0, 2, 1, 3, 4).reshape(th * h, tw * w, d)
            loc = torch.cat([loc, nl.expand(th * h, 1, d)], 1).reshape(-1, d)
            out.append(torch.cat([glob, sep[None], loc]))
            t += 1 + tw * th
        e = e.clone()
        e[ids == image_token] = torch.cat(out)
        return e

    def attention(self, x, p):
        lc, (b, s, d) = self.lc, x.shape
        h, pos = lc["num_attention_heads"], torch.arange(s)
        if lc["use_mla"]:
            nope, rope, vd = lc["qk_nope_head_dim"], lc["qk_rope_head_dim"], lc["v_head_dim"]
            q = self.lin(_rms(self.lin(x, f"{p}.q_a_proj"), self.w[f"{p}.q_a_layernorm.weight"]), f"{p}.q_b_proj")
            q = q.view(b, s, h, nope + rope).transpose(1, 2)
            ckv, k_pe = self.lin(x, f"{p}.kv_a_proj_with_mqa").split([lc["kv_lora_rank"], rope], -1)
            kv = self.lin(_rms(ckv, self.w[f"{p}.kv_a_layernorm.weight"]), f"{p}.kv_b_proj")
            k_nope, v = kv.view(b, s, h, nope + vd).transpose(1, 2).split([nope, vd], -1)
            q = torch.cat([q[..., :nope], _rope(q[..., nope:], pos, lc["rope_theta"], True)], -1)
            k_pe = _rope(k_pe[:, None], pos, lc["rope_theta"], True).expand(b, h, s, rope)
            k, scale = torch.cat([k_nope, k_pe], -1), (nope + rope) ** -0.5
        else:
            q, k, v = (self.lin(x, f"{p}.{n}_proj").view(b, s, h, d // h).transpose(1, 2) for n in "qkv")
            q, k = (_rope(t, pos, lc["rope_theta"], False) for t in (q, k))
            scale = (d // h) ** -0.5
        att = (q @ k.transpose(-1, -2) * scale).masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), -math.inf)
        return self.lin((att.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1), f"{p}.o_proj")

    def mlp(self, x, p):
        return self.lin(F.silu(self.lin(x, f"{p}.gate_proj")) * self.lin(x, f"{p}.up_proj"), f"{p}.down_proj")

    def moe(self, x, p):
        lc, xf = self.lc, x.reshape(-1, x.shape[-1])
        logits = F.linear(xf, self.w[f"{p}.gate.weight"])
        scores = logits.softmax(-1) if lc["scoring_func"] == "softmax" else logits.sigmoid()
        k = lc["num_experts_per_tok"]
        if lc["topk_method"] == "noaux_tc":   # one group: the biased scores choose, the raw ones weigh
            idx = (scores + self.w[f"{p}.gate.e_score_correction_bias"]).topk(k, -1).indices
            weight = scores.gather(1, idx)
        else:
            weight, idx = scores.topk(k, -1)
        if k > 1 and lc["norm_topk_prob"]:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        weight = weight * lc["routed_scaling_factor"]
        y = torch.zeros_like(xf)
        for e in range(lc["n_routed_experts"]):
            tok, slot = torch.where(idx == e)
            if len(tok):
                y.index_add_(0, tok, self.mlp(xf[tok], f"{p}.experts.{e}") * weight[tok, slot, None])
        return (y + self.mlp(xf, f"{p}.shared_experts")).view(x.shape)

    def __call__(self, ids, pixels=None, crops=()):
        h, lc = self.embeds(ids, pixels, crops), self.lc
        for i in range(lc["num_hidden_layers"]):
            p = f"language.model.layers.{i}"
            h = h + self.attention(_rms(h, self.w[f"{p}.input_layernorm.weight"]), f"{p}.self_attn")
            x = _rms(h, self.w[f"{p}.post_attention_layernorm.weight"])
            h = h + (self.moe(x, f"{p}.mlp") if i >= lc["first_k_dense_replace"] else self.mlp(x, f"{p}.mlp"))
        return F.linear(_rms(h, self.w["language.model.norm.weight"]), self.w["language.lm_head.weight"])
