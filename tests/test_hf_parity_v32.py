"""Parity with transformers' DeepseekV32ForCausalLM (DeepSeek Sparse Attention) on tiny random checkpoints written
in the hub layout: the indexer's keys under each layer's `self_attn.indexer`, `model_type: deepseek_v32`, the legacy
`rope_scaling` spelling, and in one case FP8 weights (the indexer's wq_b / wk too) with V3.2's power-of-two
`scale_fmt: ue8m0` block scales stored as F8_E8M0, in shards. index_topk is below the prompt length, so the
indexer's choice changes every layer's output (test_sparsity_is_active checks that it does).
"""
from __future__ import annotations

import shutil

import hf_fixtures as fx
import pytest
import torch

import dsgraph

PROMPT = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(12))
NEW = 8
TOPK = 4
CASES = {"v32": {"legacy_rope": True}, "v32-fp8-ue8m0": {"fp8": (16, 16), "shards": 2},
         "v31-fp8-ue8m0": {"fp8": (16, 16), "shards": 2, "config": "v3"}}   # V3.1: V3's architecture, ue8m0 scales


def v32_config():
    from transformers import DeepseekV32Config  # the test oracle (a dev dependency)
    mla = {k: v for k, v in fx._MLA.items()}
    return DeepseekV32Config(**mla, q_lora_rank=24, num_experts_per_tok=2, n_shared_experts=1, n_group=4,
                             topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                             rope_parameters=fx._yarn(1.0, 1.0), index_n_heads=8, index_head_dim=16,
                             index_topk=TOPK)


class Case:
    def __init__(self, name, path):
        how = CASES[name]
        self.path = path
        config = fx.tiny_config(how["config"]) if "config" in how else v32_config()
        self.hf = fx.hf_model(config, seed=sum(map(ord, name)))
        if how.get("fp8"):
            fx.fp8_roundtrip_(self.hf, how["fp8"], ue8m0=True)
        self.hf.save_pretrained(path)
        if how.get("legacy_rope"):
            fx.edit_config(path, fx.legacy_rope_spelling)
        if how.get("fp8"):
            fx.quantize_checkpoint_fp8(path, how["fp8"], shards=how["shards"], ue8m0=True)
        with torch.no_grad():
            self.logits = self.hf(PROMPT).logits.float()
            self.tokens = self.hf.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[:, 9:]


_CACHE: dict[str, Case] = {}
_one_thread = pytest.fixture(scope="module", autouse=True)(fx.one_thread)


@pytest.fixture(params=list(CASES))
def case(request, tmp_path_factory):
    if request.param not in _CACHE:
        _CACHE[request.param] = Case(request.param, tmp_path_factory.mktemp(request.param))
    return _CACHE[request.param]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_checkpoint_is_in_hub_layout(case):
    tensors = fx.read_tensors(case.path)
    if case.path.name.startswith("v31"):
        assert tensors["model.layers.1.self_attn.q_b_proj.weight_scale_inv"].dtype == torch.float8_e8m0fnu
        return
    assert "model.layers.0.self_attn.indexer.k_norm.bias" in tensors
    assert "model.layers.2.self_attn.indexer.weights_proj.weight" in tensors
    if "fp8" in case.path.name:
        assert tensors["model.layers.1.self_attn.indexer.wq_b.weight"].dtype == torch.float8_e4m3fn
        assert tensors["model.layers.1.self_attn.indexer.wk.weight_scale_inv"].dtype == torch.float8_e8m0fnu


def test_logits_and_greedy_tokens_match_transformers(case):
    model = dsgraph.load(str(case.path), mtp=False)
    assert model.config.fp8_scale_fmt == ("ue8m0" if "ue8m0" in case.path.name else None)
    if not case.path.name.startswith("v31"):
        assert model.config.index_topk == TOPK and "cache.0.index_k" in model.graph.inputs
    exe = dsgraph.compile(model, backend="eager")
    assert rel(exe(PROMPT), case.logits) < 1e-4
    assert torch.equal(exe.generate(PROMPT, max_new_tokens=NEW), case.tokens)


def test_sparsity_is_active(case, tmp_path):
    """With a top-k as wide as the whole sequence (dense attention) the logits move away from transformers'."""
    if case.path.name.startswith("v31"):
        pytest.skip("V3.1 has dense attention")
    dense = shutil.copytree(case.path, tmp_path / "dense")
    fx.edit_config(dense, lambda c: {**c, "index_topk": 64})
    assert rel(dsgraph.compile(dsgraph.load(str(dense), mtp=False), backend="eager")(PROMPT), case.logits) > 1e-3


def test_kept_fp8_ue8m0_scales_match(tmp_path_factory):
    """keep_fp8=True: the F8_E8M0 scales are read as float32 powers of two beside the e4m3 weights."""
    case = Case("v32-fp8-ue8m0", tmp_path_factory.mktemp("kept")) if "v32-fp8-ue8m0" not in _CACHE \
        else _CACHE["v32-fp8-ue8m0"]
    model = dsgraph.load(str(case.path), mtp=False, keep_fp8=True)
    name = "model.layers.0.self_attn.indexer.wk.weight_scale_inv"
    s = model.weights[name]
    assert s.dtype == torch.float32 and bool((torch.frexp(s)[0] == 0.5).all())
    assert rel(dsgraph.compile(model, backend="eager")(PROMPT), case.logits) < 1e-4


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_backends_generate_transformers_tokens(backend, tmp_path_factory):
    """The V3.2 checkpoint compiled for the triton (interpreter) and tvm (llvm) backends generates transformers'
    greedy tokens, sparsity active."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    if "v32" not in _CACHE:
        _CACHE["v32"] = Case("v32", tmp_path_factory.mktemp("v32"))
    case = _CACHE["v32"]
    exe = dsgraph.compile(dsgraph.load(str(case.path), mtp=False), backend=backend, device="cpu")
    assert not exe.compiled.report.fallbacks
    assert rel(exe(PROMPT), case.logits) < 1e-4
    assert torch.equal(exe.generate(PROMPT, max_new_tokens=4), case.tokens[:, :4])   # greedy: a prefix of NEW
