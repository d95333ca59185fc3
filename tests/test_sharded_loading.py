"""Sharded loading: a rank reads only its slices of a safetensors checkpoint (bytes counted), FP8 weights keep
their block scales sliced with them (proven by the multi-rank interpreter), and the sliced tensors are the
checkpoint's."""
import json

import pytest
import torch
from dsgraph.models.hf_shards import dequant_read
from dsgraph.passes.check_sharded import check_sharded
from dsgraph.passes.shard import Shard
from hf_fixtures import write_tensors

import dsgraph
from dsgraph import models
from dsgraph.ops.mlp import dequant_fp8_block
from dsgraph.parallel import ParallelPlan
from dsgraph.runtime.distributed import read_note

PRESET = "deepseek-v3-fp8-tiny"
OVERRIDES = {"num_hidden_layers": 2}
BLOCK = (16, 16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    m = models.build_model(PRESET, overrides=OVERRIDES)
    (root / "config.json").write_text(json.dumps({**models.preset_config(PRESET), **OVERRIDES}))
    write_tensors(root, {k: m.weights[k] for k in m.weights}, shards=2)
    return root


@pytest.mark.parametrize("keep_fp8", [True, False])
def test_a_rank_reads_only_its_slices(checkpoint, keep_fp8):
    model = dsgraph.load(str(checkpoint), keep_fp8=keep_fp8)
    full = models.build_model(PRESET, overrides=OVERRIDES).weights
    res = Shard(plan=ParallelPlan(tp=2, ep=2), rank=1)(model.graph, model.weights)
    assert model.weights.reader.bytes_read == 0
    mine = {name: res.weights[name] for name in res.graph.params()}
    read = model.weights.reader.bytes_read
    if keep_fp8:  # every param is read as stored: exactly its slice's bytes
        assert read == sum(v.type.nbytes() for v in res.graph.params().values())
    assert read < 0.6 * model.weights.reader.total_bytes
    for name, (src, dim, start, stop) in res.graph.meta["shard"]["params"].items():
        whole = full[src]
        if not keep_fp8 and src + "_scale_inv" in full:  # the dense graph reads the weight dequantised
            whole = dequant_fp8_block(whole, full[src + "_scale_inv"], BLOCK)
        assert torch.equal(mine[name], whole.narrow(dim, start, stop - start)), name
    assert read_note(res.weights, 1).startswith("rank 1 read ")


def test_fp8_block_scales_are_sliced_with_their_blocks(checkpoint):
    model = dsgraph.load(str(checkpoint), keep_fp8=True)
    res = check_sharded(model.graph, model.weights, ParallelPlan(tp=2), seq=3)
    assert res.ok, res.report()


def test_a_cut_inside_a_scale_block_is_refused():
    m = models.build_model(PRESET, overrides={**OVERRIDES, "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]}}, weights=False)
    with pytest.raises(dsgraph.DSGraphError, match="inside a 64-wide scale block"):
        Shard(plan=ParallelPlan(tp=2), rank=1)(m.graph, m.weights)


def test_an_fp8_slice_off_the_block_grid_reads_the_covering_blocks(checkpoint):
    shards = dsgraph.load(str(checkpoint)).weights.reader
    name = "model.layers.0.mlp.gate_proj.weight"
    whole = dequant_fp8_block(shards.read(name), shards.read(name + "_scale_inv"), BLOCK)
    for index in [(slice(5, 21),), (slice(None), slice(3, 40))]:
        assert torch.equal(dequant_read(shards, name, name + "_scale_inv", BLOCK, index), whole[index])
