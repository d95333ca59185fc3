"""DeepSeek-V4's MTP block against a torch reference of DeepSeek's published `MTPBlock` (inference/model.py of
deepseek-ai/DeepSeek-V4-Flash; transformers does not build it and ignores `mtp.*`), on a tiny random checkpoint in
DeepSeek's naming with FP8 / MXFP4 weights:

    h       = the main model's hc_mult streams after the last block (before the hyper-head), from transformers
    x       = e_proj(enorm(embed(token t+1))), broadcast to every stream, + h_proj(hnorm(h))
    x       = one V4 block with the mtp.0 weights (transformers' DeepseekV4DecoderLayer: sliding attention as
              compress_ratios[num_hidden_layers] = 0 ships it, score-routed MoE, its own mHC)
    logits  = head(norm(hc_head(x)))  with the block's own hc_head_* and norm, the main model's head
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dsgraph.models import load_checkpoint, preset_config
from dsgraph.models.v4_config import SLIDING
from safetensors.torch import load_file, save_file
from test_mtp_reference import run_mtp
from v4_fixtures import one_thread, oracle, write_v4  # noqa: F401 (autouse fixture)

from dsgraph.numerics import rel_err

pytest.importorskip("transformers.models.deepseek_v4")
CFG = preset_config("deepseek-v4-tiny")
L, EPS = CFG["num_hidden_layers"], 1e-6   # rms_norm_eps and hc_eps of the preset
OWN = ("e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight", "hc_head_fn",
       "hc_head_base", "hc_head_scale")     # the MTP block's own tensors outside its decoder layer
SEQ = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(11))   # 12 positions: past the window


def _rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4mtp")
    return root, write_v4(root / "q", seed=4, quantised=True)


def reference_mtp(root, meant, ids, nxt):
    """MTP logits [B, S, V] from the published formula, on the checkpoint's (dequantised) tensors."""
    own = {k.removeprefix("mtp.0."): v for k, v in meant.items() if k.startswith("mtp.0.")}
    main = {k: v for k, v in meant.items() if not k.startswith("mtp.")}
    # transformers with one more layer holding the block's decoder layer (its own conversion mapping names it)
    layer = {f"layers.{L}.{k}": v for k, v in own.items() if k not in OWN}
    hf = oracle(root / "oracle", {**main, **layer}, num_hidden_layers=L + 1, layer_types=CFG["layer_types"] + [SLIDING])
    assert hf.config.mlp_layer_types[L] == "moe"

    def mtp_input(module, args, kwargs):     # the main streams h enter the block as the formula's x
        e = _rms(F.embedding(nxt, meant["embed.weight"]), own["enorm.weight"])
        x = F.linear(e, own["e_proj.weight"])[:, :, None] + F.linear(_rms(args[0], own["hnorm.weight"]),
                                                                     own["h_proj.weight"])
        return (x, *args[1:]), {**kwargs, "input_ids": nxt}

    got = {}
    hf.model.layers[L].register_forward_pre_hook(mtp_input, with_kwargs=True)
    hf.model.layers[L].register_forward_hook(lambda m, a, out: got.update(x=out))
    with torch.no_grad():
        hf(ids)
    x = got["x"]
    flat = x.flatten(2)
    mixes = F.linear(flat, own["hc_head_fn"]) * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + EPS)
    pre = torch.sigmoid(mixes * own["hc_head_scale"] + own["hc_head_base"]) + 1e-6
    return F.linear(_rms((pre[..., None] * x).sum(2), own["norm.weight"]), meant["head.weight"])


def test_mtp_logits_match_the_published_block_and_its_cache(ckpt):
    root, meant = ckpt
    ids, nxt = SEQ[:, :-1], SEQ[:, 1:]
    model = load_checkpoint(root / "q")
    assert {"mtp_ids", "cache.mtp.win"} <= set(model.graph.inputs)
    assert model.weights.reader.info["mtp.0.e_proj.weight"].dtype == "float8_e4m3fn"   # FP8 as shipped
    ref = reference_mtp(root, meant, ids, nxt)
    full, _ = run_mtp(model, ids, nxt)
    assert rel_err(full["mtp_logits"], ref) < 1e-5
    # incrementally, across the MTP block's own sliding state: the same logits
    first, caches = run_mtp(model, ids[:, :7], nxt[:, :7])
    rest, _ = run_mtp(model, ids[:, 7:], nxt[:, 7:], caches, start=7)
    assert rel_err(torch.cat([first["mtp_logits"], rest["mtp_logits"]], 1), full["mtp_logits"]) < 1e-5
    # the comparison can fail: the hidden-state half of the input moves the logits
    model.weights.set("mtp.0.hnorm.weight", model.weights["mtp.0.hnorm.weight"] * 0.5)
    assert rel_err(run_mtp(model, ids, nxt)[0]["mtp_logits"], ref) > 1e-3


def test_checkpoint_without_mtp_weights_builds_without_the_block(tmp_path):
    write_v4(tmp_path / "c", seed=1)
    f = tmp_path / "c" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if not k.startswith("mtp.")}, str(f))
    with pytest.warns(UserWarning, match="no mtp.0"):
        model = load_checkpoint(tmp_path / "c")
    assert "mtp_ids" not in model.graph.inputs
    assert "mtp_ids" not in load_checkpoint(tmp_path / "c", mtp=False).graph.inputs
