"""Absorbed MLA's per-token rows as single ops, so a backend can make each one kernel at decode.

`mla.latent_row` is the latent cache row `absorb_mla` builds from the shared down-projection:
    concat(norm.rms(c_kv, w), reshape(rope(reshape(k_pe, [B,S,1,R]))), -1)   -> [B, S, C+R]
`mla.query_absorbed` is the query the absorbed attention reads:
    concat(einsum("bshd,hdc->bshc", q_nope, W_UK), rope(q_pe), -1)          -> [B, S, H, C+R]
Both round each part to the input dtype before the concat, as the unfused chains do, so the fusion passes
(passes/mla_fusion.py) change no value on fp32. The decompositions give the chains back.
"""
from __future__ import annotations

import torch

from ..types import TensorType
from .common import expect_int, expect_rank, f32, same_dtype
from .norm import rms_norm_ref
from .registry import Attr, defop, expect
from .rope import ROPE_ATTRS, rope_ref

Q_ABS = "bshd,hdc->bshc"

LATENT_ROW = defop("mla.latent_row", "c_kv k_pe norm_weight positions", {"eps": Attr(float, 1e-6), **ROPE_ATTRS},
                   "Absorbed MLA's cache row: [RMSNorm(c_kv) * norm_weight | RoPE(k_pe) at positions]; c_kv [B,S,C], "
                   "k_pe [B,S,R] (one shared rope head, not yet rotated) -> [B,S,C+R].", level="domain")


@LATENT_ROW.infer
def _(c, k_pe, nw, positions, eps, **rope):
    expect_rank(c, 3, "mla.latent_row c_kv [B,S,C]")
    expect_rank(k_pe, 3, "mla.latent_row k_pe [B,S,R]")
    expect(k_pe.shape[:2] == c.shape[:2] and nw.shape == c.shape[2:],
           f"mla.latent_row: c_kv {c}, k_pe {k_pe} and norm weight {nw} disagree (need [B,S,C], [B,S,R], [C])")
    expect(isinstance(k_pe.shape[2], int) and k_pe.shape[2] % 2 == 0, f"mla.latent_row: rope width of {k_pe} must "
                                                                         "be even")
    expect_int(positions, "mla.latent_row positions")
    expect(positions.shape == c.shape[:2], f"mla.latent_row: positions {positions} must be [B, S] of {c}")
    same_dtype(c, k_pe, nw)
    return TensorType(c.shape[:2] + (c.shape[2] + k_pe.shape[2],), c.dtype)


@LATENT_ROW.reference
def _(c, k_pe, nw, positions, eps, **rope):
    roped = rope_ref(k_pe[:, :, None], positions, **rope).to(c.dtype)[:, :, 0]
    return torch.cat((rms_norm_ref(c, nw, eps).to(c.dtype), roped), dim=-1)


@LATENT_ROW.decomposition
def _(b, c, k_pe, nw, positions, eps, **rope):
    bs, s, r = k_pe.shape
    roped = b.op("rope", b.reshape(k_pe, shape=(bs, s, 1, r)), positions, **rope)
    return b.concat(b.norm.rms(c, nw, eps=eps), b.reshape(roped, shape=(bs, s, r)), dim=-1)


QUERY = defop("mla.query_absorbed", "q_nope q_pe w_uk positions", dict(ROPE_ATTRS),
              "Absorbed MLA's query: [q_nope absorbed through W_UK per head | RoPE(q_pe) at positions]; q_nope "
              "[B,S,H,dn], q_pe [B,S,H,R], w_uk [H,dn,C] -> [B,S,H,C+R].", level="domain")


@QUERY.infer
def _(q_nope, q_pe, w_uk, positions, **rope):
    expect_rank(q_nope, 4, "mla.query_absorbed q_nope [B,S,H,dn]")
    expect_rank(q_pe, 4, "mla.query_absorbed q_pe [B,S,H,R]")
    expect_rank(w_uk, 3, "mla.query_absorbed w_uk [H,dn,C]")
    expect(q_pe.shape[:3] == q_nope.shape[:3] and w_uk.shape[:2] == q_nope.shape[2:],
           f"mla.query_absorbed: q_nope {q_nope}, q_pe {q_pe} and w_uk {w_uk} disagree "
           "(need [B,S,H,dn], [B,S,H,R], [H,dn,C])")
    expect(isinstance(q_pe.shape[3], int) and q_pe.shape[3] % 2 == 0,
           f"mla.query_absorbed: rope width of {q_pe} must be even")
    expect_int(positions, "mla.query_absorbed positions")
    expect(positions.shape == q_nope.shape[:2], f"mla.query_absorbed: positions {positions} must be [B, S]")
    same_dtype(q_nope, q_pe, w_uk)
    return TensorType(q_nope.shape[:3] + (w_uk.shape[2] + q_pe.shape[3],), q_nope.dtype)


@QUERY.reference
def _(q_nope, q_pe, w_uk, positions, **rope):
    q_lat = torch.einsum(Q_ABS, f32(q_nope), f32(w_uk)).to(q_nope.dtype)
    return torch.cat((q_lat, rope_ref(q_pe, positions, **rope).to(q_nope.dtype)), dim=-1)


@QUERY.decomposition
def _(b, q_nope, q_pe, w_uk, positions, **rope):
    return b.concat(b.einsum(q_nope, w_uk, equation=Q_ABS), b.op("rope", q_pe, positions, **rope), dim=-1)
