"""Absorbed MLA's row chains as single ops (dsgraph/ops/mla_fused.py), so a decode step launches one kernel for each.

`fuse_mla_rows` rewrites two chains: the latent cache row `absorb_mla` builds,
    concat(norm.rms(c_kv), reshape(rope(reshape(k_pe))))          (after merge_qkv_a)
    concat(mla.latent_proj(x)[0], reshape(rope(reshape([1]))))   (without it: the GEMM is split off)
-> mla.latent_row(c_kv, k_pe, norm_weight, positions) (a backend may also write the row straight into the cache:
the triton backend claims cache.append(cache, mla.latent_row(...)) as one kernel), and the query absorbed
attention reads,
    concat(einsum("bshd,hdc->bshc", q_nope, W_UK), rope(q_pe))
-> mla.query_absorbed(q_nope, q_pe, W_UK, positions).

The pass needs `absorb_mla` first (it matches what that emits) and must run after `merge_qkv_a`, which looks for
mla.latent_proj. It changes no value: the fused ops round each part as the chains do.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsgraph.errors import PassError
from dsgraph.ir import Graph
from dsgraph.pattern import ANY, P, Var
from dsgraph.rewriter import Rewrite
from dsgraph.weights import WeightStore

from .base import register
from .fusion import PatternPass
from .mla import Q_ABS


def _last(d) -> bool:
    """A concat dim that may be the last one (rows are rank 3, heads rank 4; `_last_dim` checks it exactly)."""
    return d in (-1, 2, 3)


def _last_dim(node) -> bool:
    return node.attrs["dim"] in (-1, len(node.outputs[0].shape) - 1)


def _rope_row(k_pe: P) -> P:
    """reshape(rope(reshape(k_pe, [B,S,1,R])), [B,S,R]): the one shared rope head, rotated."""
    return P("reshape", P("rope", P("reshape", k_pe, shape=ANY, name="head"), Var("pos"), name="rope"), shape=ANY)


def _latent_row_rules() -> list[Rewrite]:
    def row(b, m, c, k_pe, nw, eps):
        if not _last_dim(m.root) or len(k_pe.shape) != 3 or m.node("head").outputs[0].shape[2] != 1 \
                or len(c.shape) != 3:
            return None
        return {m.root_value: b.mla.latent_row(c, k_pe, nw, m["pos"], eps=eps, **m.node("rope").attrs)}

    def from_rms(b, m):
        return row(b, m, m["c"], m["k"], m["nw"], m.attr("eps", "rms"))

    def from_proj(b, m):
        proj = m.node("lat")
        rank = proj.attrs["kv_lora_rank"]
        x, w, nw = proj.inputs
        c, k_pe = b.split(b.linear(x, w), sizes=(rank, w.shape[0] - rank), dim=-1)
        return row(b, m, c, k_pe, nw, proj.attrs["eps"])

    def lat(i: int, **name) -> P:
        return P("mla.latent_proj", Var("x"), Var("w"), Var("nw"), out=i, kv_lora_rank=ANY, eps=ANY, **name)

    rms = P("norm.rms", Var("c"), Var("nw"), eps=ANY, name="rms")
    return [Rewrite("latent_row", P("concat", rms, _rope_row(Var("k")), dim=_last), from_rms),
            Rewrite("latent_row_proj", P("concat", lat(0, name="lat"), _rope_row(lat(1)), dim=_last), from_proj)]


def _query_rule() -> Rewrite:
    def build(b, m):
        if not _last_dim(m.root):
            return None
        return {m.root_value: b.mla.query_absorbed(m["qn"], m["qp"], m["w"], m["pos"], **m.node("rope").attrs)}

    pattern = P("concat", P("einsum", Var("qn"), Var("w"), equation=Q_ABS),
                P("rope", Var("qp"), Var("pos"), name="rope"), dim=_last)
    return Rewrite("query_absorbed", pattern, build)


@register
@dataclass
class FuseMLARows(PatternPass):
    """The latent cache row -> mla.latent_row and the absorbed query -> mla.query_absorbed (module docstring)."""

    name = "fuse_mla_rows"
    description = "absorbed MLA's cache row and query (RMSNorm/absorb + RoPE + concat) -> mla.latent_row, " \
                  "mla.query_absorbed"
    requires = ("absorb_mla",)

    def check_preconditions(self, graph: Graph) -> None:
        if graph.find("attention.mla") or graph.find("attention.mla_sparse"):
            raise PassError(f"{self.name} needs absorb_mla first: the graph still has naive MLA attention; run "
                            f"['absorb_mla', '{self.name}']")

    def rewrites(self, graph: Graph, weights: WeightStore) -> list[Rewrite]:
        return [*_latent_row_rules(), _query_rule()]
