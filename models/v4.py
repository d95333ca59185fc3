"""DeepSeek-V4 in the IR, top to bottom as transformers' `DeepseekV4ForCausalLM` reads (the oracle):
embed -> hc_mult residual streams -> blocks (mHC mix, attention, mHC merge, mHC mix, MoE, mHC merge) ->
hyper-head -> norm -> head; then the MTP block (DeepSeek's inference/model.py `MTPBlock`, which transformers does
not build): it takes the main model's hc_mult streams after the last block (before the hyper-head), adds
e_proj(enorm(embed(token t+1))) to every stream of h_proj(hnorm(streams)), runs one block of its own and merges
with its own hyper-head and norm into the shared head: the prediction of token t+2.

Attention per layer type (V4Config.layer_types): every layer attends its sliding window of shared K = V rows
(one KV head, partial interleaved RoPE on the trailing qk_rope_head_dim dims, a per-head sink); CSA and HCA
layers add compressed entries (dsgraph/ops/v4_attn.py), CSA picking top-k of them with its lightning indexer.
Sliding layers rotate with `rope_theta`, compressed ones with `compress_rope_theta` + YaRN (no mscale).

Graph interface: inputs input_ids, positions [B,S] (consecutive per row) and per layer the caches
  cache.L.win [B,W-1,D]           the last W-1 K=V rows (a fixed-size sliding state)
  cache.L.cmp_state [B,R,2C]      the compressor's raw (kv | gate) rows not yet pooled (CSA / HCA)
  cache.L.cmp [B,T//m,D]          compact compressed entries, one per complete group of m tokens (CSA / HCA)
  cache.L.index_state, cache.L.index_k [B,T//m,d]   the CSA indexer's compressor state and compact keys
  cache.tokens [B,T,0]            no values: its length is the tokens so far, which the compressors need (how
                                  many groups a step completes depends on T, not only on T//m); the MTP block
                                  has its own, cache.mtp.tokens
and with MTP: mtp_ids [B,S] (token t+1 for each position t) and the MTP block's caches cache.mtp.*;
outputs logits [B,S,V] fp32, each cache's `.next`, with MTP mtp_logits [B,S,V] and mtp_hidden [B,S,N,D] (the
block's output streams, fed back as the hidden state to draft further ahead). Param names are DeepSeek's own
checkpoint keys (the MTP block's under `mtp.0.`; it shares `embed.weight` and `head.weight`).
"""
from __future__ import annotations

import torch

from dsgraph.builder import GraphBuilder
from dsgraph.weights import WeightStore

from .random_weights import _gen, random_weights
from .v4_config import CSA, SLIDING, V4Config


class V4Builder:
    def __init__(self, cfg: V4Config, dtype: str = "float32", name: str = "model", mtp: bool = True):
        self.cfg, self.dtype = cfg, dtype
        self.mtp = mtp and cfg.num_nextn_predict_layers > 0
        self.b = GraphBuilder(name, dtype)
        self._tokens: dict = {}
        self.main_rope = {"theta": float(cfg.rope_theta), "interleaved": True}
        rs = cfg.rope_scaling
        self.compress_rope = {"theta": float(cfg.compress_rope_theta), "interleaved": True}
        if rs:   # V4 keeps YaRN's frequencies but not its cos/sin multiplier (attention_factor 1)
            self.compress_rope.update(scaling="yarn", factor=float(rs["factor"]), mscale=1.0, mscale_all_dim=1.0,
                                      original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
                                      beta_fast=float(rs.get("beta_fast", 32)), beta_slow=float(rs.get("beta_slow", 1)))

    # helpers -------------------------------------------------------------------
    def weight(self, name: str, out_f: int, in_f: int):
        """A [out, in] matrix; FP8 checkpoints ship the compressors and the indexer's weights_proj unquantised."""
        b, fp8 = self.b, self.cfg.fp8_block_size
        if not fp8 or ".compressor." in name or name.endswith("weights_proj"):
            return b.param(f"{name}.weight", (out_f, in_f))
        w = b.param(f"{name}.weight", (out_f, in_f), "float8_e4m3fn")
        s = b.param(f"{name}.scale", (-(-out_f // fp8[0]), -(-in_f // fp8[1])), "float32")
        w = b.dequant_fp8(w, s, block=fp8)
        return w if self.dtype == "float32" else b.cast(w, dtype=self.dtype)

    def expert_weight(self, name: str, out_f: int, in_f: int):
        if self.cfg.expert_dtype != "fp4":
            return self.weight(name, out_f, in_f)
        b = self.b
        w = b.param(f"{name}.weight", (out_f, in_f // 2), "int8")
        s = b.param(f"{name}.scale", (out_f, in_f // 32), "uint8")
        return b.dequant_mxfp4(w, s, dtype=self.dtype)

    def linear(self, x, name: str, out_f: int, in_f: int):
        return self.b.linear(x, self.weight(name, out_f, in_f))

    def norm(self, x, name: str, dim: int):
        return self.b.norm.rms(x, self.b.param(f"{name}.weight", (dim,)), eps=self.cfg.rms_norm_eps)

    def rope_tail(self, x, positions, rope: dict):
        """RoPE (interleaved pairs) on the trailing qk_rope_head_dim dims of x; the leading dims pass through."""
        b, dr = self.b, self.cfg.qk_rope_head_dim
        keep, rot = b.split(x, sizes=(x.shape[-1] - dr, dr), dim=-1)
        return b.concat(keep, b.rope(rot, positions, **rope), dim=-1)

    def state(self, name: str, rows: int, width: int, new):
        """A fixed-size sliding state cache: (its value before this step, paired with its next value)."""
        b = self.b
        st = b.cache_input(name, ("B", rows, width))
        b.output(f"{name}.next", b.cache.slide(st, new), cache_of=st)
        return st

    def entries(self, name: str, ratio: int, width: int, new):
        """A compact cache [B, T//ratio, width] after appending the step's completed entries `new`."""
        b = self.b
        c = b.cache_input(name, ("B", f"T//{ratio}", width))
        full = b.cache.append(c, new)
        b.output(f"{name}.next", full, cache_of=c)
        return full

    def tokens(self, cache: str, x):
        """The token-count cache `{cache prefix}.tokens` [B,T,0] before this step (one per graph part: the main
        layers', the MTP block's), appended with S empty rows (of x [B,S,D], so in the model's dtype)."""
        name = "cache.mtp.tokens" if cache.startswith("cache.mtp.") else "cache.tokens"
        if name not in self._tokens:
            b = self.b
            past = b.cache_input(name, ("B", "T", 0), x.dtype)
            rows = b.slice(x, dim=2, start=0, end=0)
            b.output(f"{name}.next", b.cache.append(past, rows), cache_of=past)
            self._tokens[name] = past
        return self._tokens[name]

    # compressor ------------------------------------------------------------------
    def compress(self, x, positions, p: str, cache: str, width: int, ratio: int, overlap: bool):
        """Compact compressed entries [B,(T+S)//ratio,width]: pooled windows, normed, rotated at the group's first
        position."""
        b, c = self.b, self.cfg
        cw = 2 * width if overlap else width
        kv, gate = self.linear(x, f"{p}.wkv", cw, c.hidden_size), self.linear(x, f"{p}.wgate", cw, c.hidden_size)
        st = self.state(f"{cache}_state", (2 if overlap else 1) * ratio - 1, 2 * cw, b.concat(kv, gate, dim=-1))
        pooled, start = b.v4.compress(kv, gate, st, b.param(f"{p}.ape", (ratio, cw), "float32"), positions,
                                      self.tokens(cache, x), ratio=ratio, overlap=overlap)
        entry = self.rope_tail(self.norm(pooled, f"{p}.norm", width), start, self.compress_rope)
        return self.entries(cache, ratio, width, entry)

    def indexer(self, x, q_resid, positions, p: str, cache: str, ratio: int):
        c, b = self.cfg, self.b
        h, d = c.index_n_heads, c.index_head_dim
        with b.scope("indexer"):
            keys = self.compress(x, positions, f"{p}.indexer.compressor", f"{cache}.index", d, ratio, True)
            q = b.reshape(self.linear(q_resid, f"{p}.indexer.wq_b", h * d, c.q_lora_rank), shape=("B", "S", h, d))
            q = self.rope_tail(q, positions, self.compress_rope)
            w = self.linear(x, f"{p}.indexer.weights_proj", h, c.hidden_size)
            logits = b.indexer.logits(q, keys, w, scale=d ** -0.5 * h ** -0.5, causal=False)
            logits = b.indexer.slot_mask(logits, positions, ratio=ratio)
            return b.indexer.topk(logits, k=c.index_topk, name="selected")

    # attention -------------------------------------------------------------------
    def attention(self, x, positions, p: str, i: int, cache: str):
        c, b = self.cfg, self.b
        kind, ratio = c.layer_type(i), c.ratio(i)
        h, hd, d = c.num_attention_heads, c.head_dim, c.hidden_size
        rope = self.main_rope if kind == SLIDING else self.compress_rope
        q_resid = self.norm(self.linear(x, f"{p}.wq_a", c.q_lora_rank, d), f"{p}.q_norm", c.q_lora_rank)
        q = b.reshape(self.linear(q_resid, f"{p}.wq_b", h * hd, c.q_lora_rank), shape=("B", "S", h, hd), name="q")
        q = b.norm.rms_unweighted(q, eps=c.rms_norm_eps)
        q = self.rope_tail(q, positions, rope)
        kv = self.rope_tail(self.norm(self.linear(x, f"{p}.wkv", hd, d), f"{p}.kv_norm", hd), positions, rope)
        win = self.state(f"{cache}.win", c.sliding_window - 1, hd, kv)
        extra = []
        if kind != SLIDING:
            extra.append(self.compress(x, positions, f"{p}.compressor", f"{cache}.cmp", hd, ratio, kind == CSA))
            if kind == CSA:
                extra.append(self.indexer(x, q_resid, positions, p, cache, ratio))
        o = b.attention.sink(q, b.concat(win, kv, dim=1), b.param(f"{p}.attn_sink", (h,), "float32"), positions,
                             *extra, window=c.sliding_window, ratio=ratio, scale=hd ** -0.5)
        o = self.rope_tail(o, b.neg(positions), rope)   # K = V carried RoPE: undo it at the query position
        g = c.o_groups
        o = b.op("linear.grouped", b.reshape(o, shape=("B", "S", g, h * hd // g)),
                 self.weight(f"{p}.wo_a", g * c.o_lora_rank, h * hd // g))
        return self.linear(b.reshape(o, shape=("B", "S", g * c.o_lora_rank)), f"{p}.wo_b", d, g * c.o_lora_rank)

    # MoE -------------------------------------------------------------------------
    def moe(self, x, ids, p: str, i: int):
        c, b = self.cfg, self.b
        d, e, inter = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
        xf = b.reshape(x, shape=("B*S", d), name="tokens")
        logits = b.linear(xf, b.param(f"{p}.gate.weight", (e, d)), name="router_logits")
        rsf = c.routed_scaling_factor
        if i < c.num_hidden_layers and c.mlp_layer_types[i] == "hash_moe":   # the MTP block routes by score
            table = b.param(f"{p}.gate.tid2eid", (c.vocab_size, c.num_experts_per_tok), "int64")
            w, idx = b.moe.route_hash(logits, table, b.reshape(ids, shape=("B*S",)), routed_scaling_factor=rsf)
        else:
            w, idx = b.moe.route_sqrtsoftplus(logits, b.param(f"{p}.gate.bias", (e,), "float32"),
                                              top_k=c.num_experts_per_tok, routed_scaling_factor=rsf)
        ws = []
        for j in range(e):
            q = f"{p}.experts.{j}"
            ws += [self.expert_weight(f"{q}.w1", inter, d), self.expert_weight(f"{q}.w3", inter, d),
                   self.expert_weight(f"{q}.w2", d, inter)]
        out = b.moe.experts_clamped(xf, w, idx, *ws, num_experts=e, limit=c.swiglu_limit, name="routed")
        si = inter * c.n_shared_experts
        if si:
            sp = f"{p}.shared_experts"
            out = b.add(out, b.mlp.swiglu_clamped(xf, self.weight(f"{sp}.w1", si, d), self.weight(f"{sp}.w3", si, d),
                                                  self.weight(f"{sp}.w2", d, si), limit=c.swiglu_limit))
        return b.reshape(out, shape=("B", "S", d))

    # blocks ----------------------------------------------------------------------
    def hc(self, h, name: str, fn):
        c, b = self.cfg, self.b
        n, d = c.hc_mult, c.hidden_size
        collapsed, post, comb = b.hc.pre(
            h, b.param(f"{name}_fn", ((2 + n) * n, n * d), "float32"), b.param(f"{name}_base", ((2 + n) * n,),
                                                                              "float32"),
            b.param(f"{name}_scale", (3,), "float32"), iters=c.hc_sinkhorn_iters, eps=c.hc_eps,
            norm_eps=c.rms_norm_eps, name=name.rsplit(".", 1)[-1])
        return b.hc.post(h, fn(collapsed), post, comb)

    def block(self, h, ids, positions, i: int):
        """Decoder layer i (i = num_hidden_layers: the MTP block's own layer, params `mtp.0.`, caches cache.mtp)."""
        c = self.cfg
        mtp = i >= c.num_hidden_layers
        p, cache = ("mtp.0", "cache.mtp") if mtp else (f"layers.{i}", f"cache.{i}")
        with self.b.scope("mtp" if mtp else f"L{i}"):
            h = self.hc(h, f"{p}.hc_attn", lambda x: self.attention(
                self.norm(x, f"{p}.attn_norm", c.hidden_size), positions, f"{p}.attn", i, cache))
            return self.hc(h, f"{p}.hc_ffn", lambda x: self.moe(
                self.norm(x, f"{p}.ffn_norm", c.hidden_size), ids, f"{p}.ffn", i))

    def hc_head(self, h, p: str):
        """The hyper-head merging the N streams, then the final norm: [B,S,N,D] -> [B,S,D]."""
        c, b = self.cfg, self.b
        n, d = c.hc_mult, c.hidden_size
        x = b.hc.head(h, b.param(f"{p}hc_head_fn", (n, n * d), "float32"), b.param(f"{p}hc_head_base", (n,), "float32"),
                      b.param(f"{p}hc_head_scale", (1,), "float32"), eps=c.hc_eps, norm_eps=c.rms_norm_eps)
        return self.norm(x, f"{p}norm", d)

    def mtp_branch(self, h, positions, head):
        """DeepSeek-V4's MTP block on the main streams h [B,S,N,D]: predicts token t+2 from h_t and token t+1."""
        c, b = self.cfg, self.b
        n, d, p = c.hc_mult, c.hidden_size, "mtp.0"
        with b.scope("mtp"):
            ids = b.input("mtp_ids", ("B", "S"))
            e = self.norm(b.embed(ids, b.param("embed.weight", (c.vocab_size, d)), name="embed"), f"{p}.enorm", d)
            e = b.expand(b.reshape(self.linear(e, f"{p}.e_proj", d, d), shape=("B", "S", 1, d)),
                         shape=("B", "S", n, d))
            x = b.add(e, self.linear(self.norm(h, f"{p}.hnorm", d), f"{p}.h_proj", d, d), name="mtp_in")
        x = self.block(x, ids, positions, c.num_hidden_layers)
        b.output("mtp_hidden", x)   # chaining the block on its own output drafts depth > 1
        with b.scope("mtp"):
            logits = b.linear(self.hc_head(x, f"{p}."), head, name="logits")
            b.output("mtp_logits", b.cast(logits, dtype="float32", name="logits_f32"))

    def build(self):
        c, b = self.cfg, self.b
        n, d = c.hc_mult, c.hidden_size
        ids, positions = b.input("input_ids", ("B", "S")), b.input("positions", ("B", "S"))
        x = b.embed(ids, b.param("embed.weight", (c.vocab_size, d)), name="embed")
        h = b.expand(b.reshape(x, shape=("B", "S", 1, d)), shape=("B", "S", n, d), name="streams")
        for i in range(c.num_hidden_layers):
            h = self.block(h, ids, positions, i)
        head = b.param("head.weight", (c.vocab_size, d))
        logits = b.linear(self.hc_head(h, ""), head, name="logits")
        b.output("logits", b.cast(logits, dtype="float32", name="logits_f32"))
        if self.mtp:
            self.mtp_branch(h, positions, head)
        g = b.build()
        g.meta.update(family="v4", model_type=c.model_type, vocab_size=c.vocab_size,
                      max_position_embeddings=c.max_position_embeddings, config=c.to_dict())
        return g


def v4_random_weights(graph, cfg: V4Config, seed: int = 0, device: str = "cpu") -> WeightStore:
    """random_weights, with each hash layer's tid2eid a table of distinct expert ids per token."""
    store = random_weights(graph, seed, device)
    for name, v in graph.params().items():
        if name.endswith("tid2eid"):
            vocab, k = v.type.concrete({})
            store.set(name, lambda n=name, vocab=vocab, k=k: torch.rand(
                vocab, cfg.n_routed_experts, generator=_gen(seed, n, device), device=device).argsort(-1)[:, :k])
    return store
