"""DeepSeek-V4 (tiny: sliding, CSA and HCA layers, hash and scored MoE) against transformers' DeepseekV4ForCausalLM
on checkpoints in DeepSeek's own naming: logits and greedy tokens over prompts longer than the window (8) that
close several compression groups (CSA 4, HCA 8) with the indexer's top-2 choosing; the FP8 + MXFP4 layout, lazy;
prefill-then-decode equal to one long prefill (the compressor's state across step boundaries). The FP8 + MXFP4
checkpoint kept quantised runs on triton (interpreter) with the experts' fused MoE reading MXFP4, equal to eager."""
from __future__ import annotations

import pytest
import torch
from dsgraph.models import build_model, load_checkpoint
from v4_fixtures import one_thread, oracle, write_v4  # noqa: F401 (autouse fixture)

import dsgraph
from dsgraph.numerics import rel_err

pytest.importorskip("transformers.models.deepseek_v4")
PROMPT = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4")
    tensors = write_v4(root / "float")
    return root, tensors, oracle(root / "oracle", tensors)


def test_logits_and_greedy_tokens_match_transformers(ckpt):
    root, _, hf = ckpt
    exe = dsgraph.compile(load_checkpoint(root / "float"), backend="eager")
    with torch.no_grad():
        want = hf(PROMPT).logits
        want_tokens = hf.generate(PROMPT[:, :13], max_new_tokens=8, do_sample=False)[:, 13:]
    assert rel_err(exe(PROMPT), want) < 1e-5
    assert torch.equal(exe.generate(PROMPT[:, :13], max_new_tokens=8), want_tokens)


def test_fp8_and_mxfp4_checkpoint_loads_lazily_and_matches(ckpt, tmp_path):
    meant = write_v4(tmp_path / "q", quantised=True)
    model = load_checkpoint(tmp_path / "q")
    assert model.weights.reader.bytes_read == 0 and all(model.weights.is_lazy(k) for k in model.weights)
    assert not any(v.type.dtype in ("int8", "float8_e4m3fn") for v in model.graph.params().values())
    kept = load_checkpoint(tmp_path / "q", keep_fp8=True, keep_fp4=True)
    ops = {n.op for n in kept.graph.nodes}
    assert {"dequant_fp8", "dequant_mxfp4"} <= ops
    with torch.no_grad():
        want = oracle(tmp_path / "oracle", meant)(PROMPT).logits
    for m in (model, kept):
        assert rel_err(dsgraph.compile(m, backend="eager")(PROMPT), want) < 1e-5
    assert rel_err(want, ckpt[2](PROMPT).logits.detach()) > 1e-4     # the quantisation is really there
    pytest.importorskip("triton")
    exe = dsgraph.compile(kept, backend="triton", device="cpu")     # the experts run MXFP4, never dequantised
    moe = [k for k in exe.compiled.report.kernels if "moe.permute" in k.op]
    assert moe and all(k.kernel.startswith("moe_mxfp4.fused_moe_mxfp4") for k in moe)
    assert not any(k.op == "dequant_mxfp4" for k in exe.compiled.report.kernels)
    assert rel_err(exe(PROMPT[:1, :5]), dsgraph.compile(kept, backend="eager")(PROMPT[:1, :5])) < 1e-5


def test_prefill_then_decode_equals_one_long_prefill():
    exe = dsgraph.compile(build_model("deepseek-v4-tiny", seed=3), backend="eager")
    full = exe(PROMPT)
    parts, state = [], exe.empty_state(2)
    for lo, hi in ((0, 9), (9, 10), (10, 11), (11, 12), (12, 18), (18, 21)):   # chunks straddling group ends
        out, state = exe.step(PROMPT[:, lo:hi], state)
        parts.append(out["logits"])
    assert rel_err(torch.cat(parts, 1), full) < 1e-5


@pytest.mark.parametrize("over", [{"sliding_window": 32}, {"index_topk": 8}, {"compress_rates": {
    "compressed_sparse_attention": 4, "heavily_compressed_attention": 32}}])
def test_window_topk_and_compression_change_the_result(over):
    base = dsgraph.compile(build_model("deepseek-v4-tiny"), backend="eager")(PROMPT)
    other = dsgraph.compile(build_model("deepseek-v4-tiny", overrides=over), backend="eager")(PROMPT)
    assert rel_err(other, base) > 1e-3
