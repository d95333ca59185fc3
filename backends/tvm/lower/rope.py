"""Rotary embedding as one TE function: Relax has no RoPE op with YaRN/llama3 scaling or the interleaved
(DeepSeek checkpoint) layout. The inverse frequencies and YaRN's cos/sin multiplier come from
`dsgraph.ops.rope.rope_frequencies` — the same table the reference uses — folded in as a constant."""
from __future__ import annotations

from dsgraph.ops.rope import rope_frequencies

from ..deps import te, tirx
from .registry import TABLE, Lowered


def rope_te(x, positions, inv_freq, mult: float, interleaved: bool, out_dtype: str):
    """x [B, S, ..., D], positions [B, S], inv_freq [D/2] -> x rotated (computed in fp32).

    Half-split layout pairs (j, j + D/2); interleaved pairs (2j, 2j + 1). Element i of the output
    needs its pair partner and the angle of its pair index.
    """
    d = int(x.shape[-1])
    half = d // 2

    def f(*idx):
        b, s, i = idx[0], idx[1], idx[-1]
        lead = idx[:-1]
        if interleaved:
            j, first = i // 2, i % 2 == 0
            partner = tirx.Select(first, i + 1, i - 1)
        else:
            j, first = tirx.indexmod(i, half), i < half
            partner = tirx.Select(first, i + half, i - half)
        angle = positions[b, s].astype("float32") * inv_freq[j]
        cos, sin = tirx.cos(angle) * mult, tirx.sin(angle) * mult
        xi, xp = x[lead + (i,)].astype("float32"), x[lead + (partner,)].astype("float32")
        # first of a pair: x1*cos - x2*sin; second: x2*cos + x1*sin
        return (xi * cos + tirx.Select(first, -xp, xp) * sin).astype(out_dtype)

    return te.compute(x.shape, f, name="rope")


@TABLE.register("rope")
def _(ctx, node):
    a = node.attrs
    x, positions = ctx.inputs(node)
    d = node.inputs[0].shape[-1]
    inv_freq, mult = rope_frequencies(a, d)
    table = ctx.const(inv_freq.float(), "float32")
    out = ctx.emit_te(rope_te, x, positions, table, float(mult), a["interleaved"], node.outputs[0].dtype, name="rope")
    layout = "interleaved" if a["interleaved"] else "half-split"
    return Lowered("tir", f"te.rope ({layout}, {a['scaling']})", outputs=[out])
