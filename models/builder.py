"""One decoder builder for every DeepSeek-family shape, reading top to bottom like
DeepSeek-V3's inference/model.py: embed -> blocks (norm, attention, norm, FFN) ->
norm -> head, then the MTP branch.

Graph interface (all families):
  inputs   input_ids [B,S] int64, positions [B,S] int64 (absolute positions),
           per layer cache.L.k [B,T,Hkv,Dk] and cache.L.v [B,T,Hkv,Dv] (naive MLA: Hkv = H,
           Dk = nope+rope), and with MTP: mtp_ids [B,S] (token t+1 for each position t)
  outputs  logits [B,S,V] fp32, cache.L.k.next / cache.L.v.next (paired in graph.cache_map),
           with MTP: mtp_logits [B,S,V] (prediction of token t+2), mtp_hidden [B,S,D] (the MTP block's
           output, fed back as the hidden state to draft further ahead) and the MTP block's caches.
Param names are the Hugging Face checkpoint keys, so the loader maps 1:1.
"""
from __future__ import annotations

from dsgraph.builder import GraphBuilder
from dsgraph.ops.rope import yarn_mscale

from .config import ModelConfig, rope_attrs
from .dsa import indexer


class DecoderBuilder:
    def __init__(self, cfg: ModelConfig, dtype: str = "float32", name: str = "model", mtp: bool = True):
        self.cfg = cfg
        self.dtype = dtype
        self.b = GraphBuilder(name, dtype)
        self.mtp = mtp and cfg.num_nextn_predict_layers > 0
        self.rope = rope_attrs(cfg)

    # small helpers -------------------------------------------------------------
    def weight(self, prefix: str, out_f: int, in_f: int):
        """A [out, in] matrix param; FP8 checkpoints store e4m3 + block scales, dequantised in the graph
        (the `fuse_fp8_linear` pass turns linear(x, dequant_fp8(w, s)) into an FP8 GEMM)."""
        b, fp8 = self.b, self.cfg.fp8_block_size
        if not fp8:
            return b.param(f"{prefix}.weight", (out_f, in_f))
        w = b.param(f"{prefix}.weight", (out_f, in_f), "float8_e4m3fn")
        s = b.param(f"{prefix}.weight_scale_inv", (-(-out_f // fp8[0]), -(-in_f // fp8[1])), "float32")
        w = b.dequant_fp8(w, s, block=fp8)
        return w if self.dtype == "float32" else b.cast(w, dtype=self.dtype)

    def linear(self, x, prefix: str, out_f: int, in_f: int, bias: bool = False):
        y = self.b.linear(x, self.weight(prefix, out_f, in_f))
        return self.b.add(y, self.b.param(f"{prefix}.bias", (out_f,))) if bias else y

    def norm(self, x, prefix: str, dim: int):
        return self.b.norm.rms(x, self.b.param(f"{prefix}.weight", (dim,)), eps=self.cfg.rms_norm_eps)

    def swiglu(self, x, prefix: str, inter: int):
        d = self.cfg.hidden_size
        return self.b.mlp.swiglu(x, self.weight(f"{prefix}.gate_proj", inter, d),
                                 self.weight(f"{prefix}.up_proj", inter, d),
                                 self.weight(f"{prefix}.down_proj", d, inter))

    # attention -----------------------------------------------------------------
    def gqa(self, x, positions, p: str, cache: str):
        c, b = self.cfg, self.b
        hq, hkv, hd, d = c.num_attention_heads, c.num_key_value_heads, c.attn_head_dim, c.hidden_size
        bias = c.attention_bias or c.qkv_bias
        q = b.reshape(self.linear(x, f"{p}.q_proj", hq * hd, d, bias), shape=("B", "S", hq, hd), name="q")
        k = b.reshape(self.linear(x, f"{p}.k_proj", hkv * hd, d, bias), shape=("B", "S", hkv, hd), name="k")
        v = b.reshape(self.linear(x, f"{p}.v_proj", hkv * hd, d, bias), shape=("B", "S", hkv, hd), name="v")
        q, k = b.rope(q, positions, **self.rope), b.rope(k, positions, **self.rope)
        kc = b.cache_input(f"{cache}.k", ("B", "T", hkv, hd))
        vc = b.cache_input(f"{cache}.v", ("B", "T", hkv, hd))
        k_all, v_all = b.cache.append(kc, k), b.cache.append(vc, v)
        b.output(f"{cache}.k.next", k_all, cache_of=kc)
        b.output(f"{cache}.v.next", v_all, cache_of=vc)
        o = b.attention.gqa(q, k_all, v_all, scale=hd ** -0.5)
        return self.linear(b.reshape(o, shape=("B", "S", hq * hd)), f"{p}.o_proj", d, hq * hd, c.attention_bias)

    def mla_scale(self) -> float:
        c = self.cfg
        scale = (c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5
        rs = c.rope_scaling
        if rs and rs.get("type") == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale = scale * m * m
        return scale

    def mla(self, x, positions, p: str, cache: str):
        c, b = self.cfg, self.b
        h, d = c.num_attention_heads, c.hidden_size
        dn, dr, dv, kvr = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        cq = None
        if c.q_lora_rank:
            cq = self.norm(self.linear(x, f"{p}.q_a_proj", c.q_lora_rank, d), f"{p}.q_a_layernorm", c.q_lora_rank)
            q = self.linear(cq, f"{p}.q_b_proj", h * (dn + dr), c.q_lora_rank)
        else:
            q = self.linear(x, f"{p}.q_proj", h * (dn + dr), d)
        q_nope, q_pe = b.split(b.reshape(q, shape=("B", "S", h, dn + dr)), sizes=(dn, dr), dim=-1, name="q")
        q_pe = b.rope(q_pe, positions, **self.rope)
        c_kv, k_pe = b.mla.latent_proj(x, self.weight(f"{p}.kv_a_proj_with_mqa", kvr + dr, d),
                                       b.param(f"{p}.kv_a_layernorm.weight", (kvr,)),
                                       kv_lora_rank=kvr, eps=c.rms_norm_eps)
        k_pe = b.rope(b.reshape(k_pe, shape=("B", "S", 1, dr)), positions, **self.rope)
        kv_b = self.weight(f"{p}.kv_b_proj", h * (dn + dv), kvr)
        k, v = b.mla.decompress(c_kv, k_pe, kv_b, num_heads=h, qk_nope_dim=dn, v_dim=dv)
        kc = b.cache_input(f"{cache}.k", ("B", "T", h, dn + dr))
        vc = b.cache_input(f"{cache}.v", ("B", "T", h, dv))
        k_all, v_all = b.cache.append(kc, k), b.cache.append(vc, v)
        b.output(f"{cache}.k.next", k_all, cache_of=kc)
        b.output(f"{cache}.v.next", v_all, cache_of=vc)
        q = b.concat(q_nope, q_pe, dim=-1)
        if c.is_dsa:  # V3.2: attend only to the positions the lightning indexer selects (models/dsa.py)
            o = b.attention.mla_sparse(q, k_all, v_all, indexer(self, x, cq, positions, p, cache),
                                       scale=self.mla_scale())
        else:
            o = b.attention.mla(q, k_all, v_all, scale=self.mla_scale())
        return self.linear(b.reshape(o, shape=("B", "S", h * dv)), f"{p}.o_proj", d, h * dv)

    # FFN -----------------------------------------------------------------------
    def moe(self, x, p: str):
        c, b = self.cfg, self.b
        d, e, inter = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
        xf = b.reshape(x, shape=("B*S", d), name="tokens")
        logits = b.linear(b.cast(xf, dtype="float32"), b.param(f"{p}.gate.weight", (e, d), "float32"),
                          name="router_logits")
        bias = [b.param(f"{p}.gate.e_score_correction_bias", (e,), "float32")] if c.topk_method == "noaux_tc" else []
        w, idx = b.moe.route(logits, *bias, top_k=c.num_experts_per_tok, scoring=c.scoring_func,
                             method=c.topk_method, n_group=c.n_group, topk_group=c.topk_group,
                             norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor,
                             name="route")
        ws = []
        for j in range(e):
            q = f"{p}.experts.{j}"
            ws += [self.weight(f"{q}.gate_proj", inter, d), self.weight(f"{q}.up_proj", inter, d),
                   self.weight(f"{q}.down_proj", d, inter)]
        routed = b.moe.experts(xf, w, idx, *ws, num_experts=e, name="routed")
        if c.n_shared_experts:
            routed = b.add(routed, self.swiglu(xf, f"{p}.shared_experts", inter * c.n_shared_experts))
        return b.reshape(routed, shape=("B", "S", d))

    # blocks ----------------------------------------------------------------------
    def block(self, h, positions, i: int, cache: str):
        c, b = self.cfg, self.b
        p = f"model.layers.{i}"
        with b.scope(f"L{i}" if i < c.num_hidden_layers else "mtp"):
            x = self.norm(h, f"{p}.input_layernorm", c.hidden_size)
            attn = self.mla if c.is_mla else self.gqa
            h = b.add(h, attn(x, positions, f"{p}.self_attn", cache), name="h_attn")
            x = self.norm(h, f"{p}.post_attention_layernorm", c.hidden_size)
            ffn = self.moe(x, f"{p}.mlp") if c.is_moe_layer(i) else self.swiglu(x, f"{p}.mlp", c.intermediate_size)
            return b.add(h, ffn, name="h")

    def build(self):
        c, b = self.cfg, self.b
        ids = b.input("input_ids", ("B", "S"))
        positions = b.input("positions", ("B", "S"))
        embed = b.param("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
        h = self.embed_tokens(ids, embed)
        for i in range(c.num_hidden_layers):
            h = self.block(h, positions, i, f"cache.{i}")
        head = embed if c.tie_word_embeddings else b.param("lm_head.weight", (c.vocab_size, c.hidden_size))
        normed = self.norm(h, "model.norm", c.hidden_size)
        self.final_hidden(normed)
        logits = b.linear(normed, head, name="logits")
        b.output("logits", b.cast(logits, dtype="float32", name="logits_f32"))
        if self.mtp:
            self.mtp_branch(h, positions)
        g = b.build()
        g.meta.update(family=c.family, model_type=c.model_type, vocab_size=c.vocab_size,
                      max_position_embeddings=c.max_position_embeddings, config=c.to_dict())
        return g

    def embed_tokens(self, ids, table):
        """The token embeddings [B,S,D]; multimodal builders splice image features in here (models/vision/)."""
        return self.b.embed(ids, table, name="embed")

    def final_hidden(self, h):
        """The final-norm hidden state [B,S,D]; Janus' generation decoder adds its codebook head here."""

    def mtp_branch(self, h, positions):
        """DeepSeek-V3 MTP (layer num_hidden_layers): predicts token t+2 from hidden_t and token t+1."""
        c, b = self.cfg, self.b
        L = c.num_hidden_layers
        p = f"model.layers.{L}"
        with b.scope("mtp"):
            ids = b.input("mtp_ids", ("B", "S"))
            emb = b.embed(ids, b.param(f"{p}.embed_tokens.weight", (c.vocab_size, c.hidden_size)), name="embed")
            d = c.hidden_size
            x = b.mtp.branch(h, emb, b.param(f"{p}.enorm.weight", (d,)), b.param(f"{p}.hnorm.weight", (d,)),
                             b.param(f"{p}.eh_proj.weight", (d, 2 * d)), eps=c.rms_norm_eps, name="mtp_in")
        x = self.block(x, positions, L, "cache.mtp")
        b.output("mtp_hidden", x)   # chaining the module on its own output drafts depth > 1
        with b.scope("mtp"):
            x = self.norm(x, f"{p}.shared_head.norm", d)
            logits = b.linear(x, b.param(f"{p}.shared_head.head.weight", (c.vocab_size, d)), name="logits")
            b.output("mtp_logits", b.cast(logits, dtype="float32", name="logits_f32"))
