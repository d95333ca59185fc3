"""Parity with transformers: for every family, a tiny random transformers model is saved, rewritten to the
hub layout (per-expert keys, FP8 block weights + MTP layer for V3, legacy `rope_scaling`, shards), loaded
with `dsgraph.load`, and must give fp32 logits within 1e-4 relative error, the same 16 greedy tokens, and
cached decode equal to full recompute.

Each case names the traps it covers; `test_trap_is_exercised` breaks one trap at a time in the loaded
graph and checks parity is lost, so a case that stopped exercising its trap would fail.
"""
from __future__ import annotations

import hf_fixtures as fx
import pytest
import torch

import dsgraph

PROMPT = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(11))
NEW = 16
# case -> (config, how the checkpoint is written)
CASES = {
    "llm": ("llm", {}),
    "coder": ("coder", {"legacy_rope": True}),
    "r1-llama": ("r1-llama", {}),
    "r1-qwen": ("r1-qwen", {"shards": 3}),
    "v2-lite": ("v2-lite", {"legacy_rope": True}),
    "v2": ("v2", {"legacy_rope": True, "shards": 2}),
    "v3": ("v3", {"shards": 3}),
    "v3-fp8-mtp": ("v3", {"fp8": (16, 16), "mtp": True, "shards": 2}),
    "v3-fused": ("v3", {"fused": True}),
}


class Case:
    """One written checkpoint with its transformers model and reference outputs (computed once)."""

    def __init__(self, name: str, path):
        cfg_name, how = CASES[name]
        self.name, self.path = name, path
        self.hf = fx.hf_model(fx.tiny_config(cfg_name), seed=sum(map(ord, name)))
        if how.get("fp8"):
            fx.fp8_roundtrip_(self.hf, how["fp8"])   # transformers runs the dequantised weights
        self.hf.save_pretrained(path, save_original_format=not how.get("fused"))
        if how.get("legacy_rope"):
            fx.edit_config(path, fx.legacy_rope_spelling)
        if how.get("mtp"):
            fx.add_tensors(path, fx.mtp_layer_tensors(self.hf.config, seed=5))
            fx.edit_config(path, lambda c: {**c, "num_nextn_predict_layers": 1})
        if how.get("fp8"):
            fx.quantize_checkpoint_fp8(path, how["fp8"])
        if how.get("shards"):
            fx.write_tensors(path, fx.read_tensors(path), how["shards"])
        with torch.no_grad():
            self.logits = self.hf(PROMPT).logits.float()
            self.tokens = self.hf.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[:, 7:]
            self.full = torch.cat([PROMPT, self.tokens], 1)
            self.full_logits = self.hf(self.full).logits.float()

    def load(self, **kw):
        return dsgraph.load(str(self.path), mtp=False, **kw)


_CACHE: dict[str, Case] = {}
_one_thread = pytest.fixture(scope="module", autouse=True)(fx.one_thread)


def get_case(name: str, tmp_path_factory) -> Case:
    if name not in _CACHE:
        _CACHE[name] = Case(name, tmp_path_factory.mktemp(name))
    return _CACHE[name]


@pytest.fixture(params=list(CASES))
def case(request, tmp_path_factory):
    return get_case(request.param, tmp_path_factory)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_checkpoint_is_in_hub_layout(case):
    keys = set(fx.read_tensors(case.path))
    fused = any(k.endswith("experts.gate_up_proj") for k in keys)
    assert fused == (case.name == "v3-fused")
    if case.name.startswith("v"):
        assert fused or any(k.endswith("experts.7.down_proj.weight") for k in keys)
    if case.name == "v3-fp8-mtp":
        assert "model.layers.3.eh_proj.weight" in keys
        assert fx.read_tensors(case.path)["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.float8_e4m3fn


def test_logits_match_transformers(case):
    exe = dsgraph.compile(case.load(), backend="eager")
    assert rel(exe(PROMPT), case.logits) < 1e-4
    assert rel(exe(case.full), case.full_logits) < 1e-4


def test_greedy_continuation_matches_transformers(case):
    exe = dsgraph.compile(case.load(), backend="eager")
    assert torch.equal(exe.generate(PROMPT, max_new_tokens=NEW), case.tokens)


def test_cached_decode_equals_full_recompute(case):
    exe = dsgraph.compile(case.load(), backend="eager")
    full = exe(case.full)
    logits, state = exe.prefill(case.full[:, :7])
    steps = [logits]
    for chunk in (case.full[:, 7:8], case.full[:, 8:11], case.full[:, 11:12]):   # 1, 3 and 1 tokens
        out, state = exe.decode(chunk, state)
        steps.append(out)
    assert rel(torch.cat(steps, 1), full[:, :12]) < 1e-5


def test_fp8_kept_as_fp8_matches_dequantised(tmp_path_factory):
    """keep_fp8=True: e4m3 params + scales, dequantised by the graph's dequant_fp8 nodes."""
    case = get_case("v3-fp8-mtp", tmp_path_factory)
    model = case.load(keep_fp8=True)
    name = "model.layers.0.self_attn.q_a_proj.weight"
    assert model.graph.params()[name].type.dtype == "float8_e4m3fn"
    assert model.weights[name].dtype == torch.float8_e4m3fn
    assert sum(n.op == "dequant_fp8" for n in model.graph.nodes) > 0
    assert rel(dsgraph.compile(model, backend="eager")(PROMPT), case.logits) < 1e-4


# trap -> (case, op whose attrs to break, the broken attrs; or a weight to zero)
TRAPS = {
    "yarn_mscale_squared": ("v2-lite", "attention.mla", lambda a: {"scale": (16 + 8) ** -0.5}),
    "yarn_rope_multiplier": ("v2", "rope", lambda a: {"mscale": a["mscale_all_dim"]}),
    "interleaved_rope": ("v3", "rope", lambda a: {"interleaved": False}),
    "group_limited_max_score": ("v2", "moe.route", lambda a: {"method": "greedy"}),
    "noaux_tc_top2_group_score": ("v3", "moe.route", lambda a: {"method": "group_limited"}),
    "llama3_scaling": ("r1-llama", "rope", lambda a: {"scaling": "none"}),
    "linear_scaling": ("coder", "rope", lambda a: {"scaling": "none"}),
    "routed_scaling_factor": ("v3", "moe.route", lambda a: {"routed_scaling_factor": 1.0}),
    "norm_topk_prob": ("v3", "moe.route", lambda a: {"norm_topk_prob": False}),
    "bias_for_selection": ("v3", "zero", "model.layers.1.mlp.gate.e_score_correction_bias"),
    "qkv_bias": ("r1-qwen", "zero", "model.layers.0.self_attn.k_proj.bias"),
}


@pytest.mark.parametrize("trap", list(TRAPS))
def test_trap_is_exercised(trap, tmp_path_factory):
    """Breaking the trap in the loaded graph must lose parity: the case really exercises it."""
    name, op, change = TRAPS[trap]
    case = get_case(name, tmp_path_factory)
    model = case.load()
    if op == "zero":
        model.weights.set(change, torch.zeros(model.weights[change].shape))
    else:
        nodes = [n for n in model.graph.nodes if n.op == op]
        assert nodes, f"no {op} node in {name}"
        for n in nodes:
            n.attrs.update(change(n.attrs))
    assert rel(dsgraph.compile(model, backend="eager")(case.full), case.full_logits) > 1e-3
