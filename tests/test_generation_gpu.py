"""Text generation on the GPU: sampling runs inside the triton backend's CUDA-graph decode steps (only the chosen
ids come back), greedy text equals eager's, and a seed gives the same text twice and eager's first tokens."""
from __future__ import annotations

import dsgraph.models as models
import pytest
import torch

import dsgraph

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = ["What is the capital of France?", "Hello!"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("preset", ["deepseek-v3-tiny", "deepseek-llm-tiny"])
def test_text_generation_under_cuda_graph_decode_gpu(preset):
    model = models.build_model(preset, seed=1)
    exe = dsgraph.compile(model, backend="triton", device="cuda")
    ref = dsgraph.compile(model, backend="eager", device="cuda")
    got = exe.generate(PROMPTS, max_new_tokens=12, temperature=0)
    assert [o.text for o in got] == [o.text for o in ref.generate(PROMPTS, max_new_tokens=12, temperature=0)]
    assert exe.compiled.decode_step.stats["graph_steps"] > 0
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=3)
    a, b = exe.generate(PROMPTS[0], **kw), exe.generate(PROMPTS[0], **kw)
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0
    graphs = exe.compiled.decode_step
    assert all(key[1] is not None for key in graphs.buffers) and graphs.stats["captures"] > 0  # sampled in-graph
    assert ref.generate(PROMPTS[0], **kw).token_ids[:4] == a.token_ids[:4]   # the same draws on eager
