"""DeepSeek-V3.2's lightning indexer, declared with the ops of dsgraph/ops/dsa.py (DeepSeek-V3.2-Exp
`inference/model.py` class `Indexer`; transformers' `DeepseekV32Indexer`).

Per layer: q = wq_b(q_resid) [B,S,Hi,Di] from MLA's normed query latent, k = LayerNorm(wk(x)) [B,S,Di]; RoPE on
the first qk_rope_head_dim dims of both, in the half-split layout (MLA's own RoPE is interleaved); k is appended
to the layer's indexer key cache `cache.L.index_k` [B,T,Di]; per-head weights weights_proj(x) in fp32. The
Hadamard rotation and FP8 quantisation of the reference are not applied (see dsgraph/ops/dsa.py). Param names are
the hub's: `model.layers.N.self_attn.indexer.{wq_b,wk,k_norm,weights_proj}`.
"""
from __future__ import annotations

K_NORM_EPS = 1e-6  # nn.LayerNorm(index_head_dim, eps=1e-6) in both references


def _rope_head(db, x, positions, rope_dims: int):
    """RoPE on the first `rope_dims` of the last dim, half-split layout; the rest passes through."""
    b = db.b
    rot, keep = b.split(x, sizes=(rope_dims, x.shape[-1] - rope_dims), dim=-1)
    return b.concat(b.rope(rot, positions, **{**db.rope, "interleaved": False}), keep, dim=-1)


def indexer(db, x, q_resid, positions, p: str, cache: str):
    """The selected positions [B,S,index_topk] (int64, -1 = empty slot) of one layer; `db` is the DecoderBuilder."""
    c, b = db.cfg, db.b
    h, d, dr = c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim
    ip = f"{p}.indexer"
    with b.scope("indexer"):
        q = b.reshape(db.linear(q_resid, f"{ip}.wq_b", h * d, c.q_lora_rank), shape=("B", "S", h, d), name="q")
        k = b.norm.layer(db.linear(x, f"{ip}.wk", d, c.hidden_size), b.param(f"{ip}.k_norm.weight", (d,)),
                         b.param(f"{ip}.k_norm.bias", (d,)), eps=K_NORM_EPS)
        q, k = _rope_head(db, q, positions, dr), _rope_head(db, k, positions, dr)
        kc = b.cache_input(f"{cache}.index_k", ("B", "T", d))
        k_all = b.cache.append(kc, k)
        b.output(f"{cache}.index_k.next", k_all, cache_of=kc)
        weights = b.linear(b.cast(x, dtype="float32"), b.param(f"{ip}.weights_proj.weight", (h, c.hidden_size),
                                                               "float32"), name="weights")
        logits = b.indexer.logits(q, k_all, weights, scale=d ** -0.5 * h ** -0.5)
        return b.indexer.topk(logits, k=c.index_topk, name="selected")
