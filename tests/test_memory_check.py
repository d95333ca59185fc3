"""A model whose weights cannot fit the device is refused before any weight is materialised."""
import dsgraph.models as models
import pytest
import torch

import dsgraph
from dsgraph.errors import DeviceMemoryError
from dsgraph.runtime import memory

CPU = torch.device("cpu")


def declared(graph):
    return sum(v.type.nbytes() for v in graph.params().values())


def test_too_large_is_refused_with_the_sizes_and_the_fix(monkeypatch):
    model = dsgraph.load("deepseek-llm-tiny")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    with pytest.raises(DeviceMemoryError, match=r"deepseek-llm-tiny .*need .* GiB on cpu.*-tiny preset") as e:
        dsgraph.compile(model)
    assert "DSGRAPH_SKIP_MEMORY_CHECK=1" in str(e.value)
    monkeypatch.setenv("DSGRAPH_SKIP_MEMORY_CHECK", "1")
    dsgraph.compile(model)


def test_full_size_preset_is_refused_quickly_on_this_machine(monkeypatch):
    """DeepSeek-V3 at full size (hundreds of GiB) never fits here: refused from the graph alone."""
    model = models.build_model("deepseek-v3", weights=True)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * 2**30)
    with pytest.raises(DeviceMemoryError, match=r"deepseek-v3 .*need [\d,.]+ GiB"):
        dsgraph.compile(model, dtype="bf16", passes="none")


def test_resident_and_shared_weights_are_not_counted_twice():
    model = dsgraph.load("deepseek-llm-tiny")
    graph, w = model.graph, model.weights
    assert memory.weight_bytes(graph, w, CPU) == declared(graph)          # lazy: all of it
    resident = w.materialize()
    assert memory.weight_bytes(graph, resident, CPU) == 0                 # already there, in the right dtype
    names = [n for n, v in graph.params().items() if v.type.shape == graph.params()["lm_head.weight"].type.shape]
    shared = torch.randn(graph.params()["lm_head.weight"].type.concrete({}), dtype=torch.float64)
    for n in names:
        resident.set(n, shared)                                             # one fp64 tensor for several params
    assert memory.weight_bytes(graph, resident, CPU) == graph.params()["lm_head.weight"].type.nbytes()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_free_memory_comes_from_the_device():
    free = memory.available_bytes(torch.device("cuda"))
    assert 0 < free <= torch.cuda.get_device_properties(0).total_memory
    model = models.build_model("deepseek-v3", weights=True)
    before = torch.cuda.memory_allocated()
    with pytest.raises(DeviceMemoryError, match=r"deepseek-v3 .*need [\d,.]+ GiB on cuda"):
        dsgraph.compile(model, dtype="bf16", device="cuda", passes="none")
    assert torch.cuda.memory_allocated() == before  # refused before any weight reached the GPU
