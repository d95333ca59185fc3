"""Every registered pass, proven by the harness on every graph of each multimodal tiny preset: the decoder (with
the image-feature splice; random features and ids), the vision tower (no cache: prefill only), Janus'
image-generation decoder and VQ decoder (random codes). The VL presets are not in models.TINY_PRESETS, whose
tests assume one graph built from a text config; here every graph is."""
import dsgraph.models as models
import dsgraph.passes as passes
import hf_fixtures as fx
import pytest
from test_passes_presets import must_change, pipeline_for

one_thread = pytest.fixture(scope="module", autouse=True)(fx.one_thread)
NAMES = sorted(n for n in passes.list_passes() if not n.startswith("test_")
               and not getattr(passes.info(n).factory, "tolerance", None))


@pytest.fixture(scope="module", params=sorted(models.VL_TINY))
def model(request):
    return models.build_model(request.param)


@pytest.mark.parametrize("part", ["decoder", "generation"])
@pytest.mark.parametrize("name", NAMES)
def test_every_pass_on_the_decoders(model, name, part):
    graph = model.graph if part == "decoder" else model.vision.generation
    if graph is None:
        pytest.skip(f"{model.name} has no image-generation decoder")
    res = passes.check(pipeline_for(name), graph, model.weights, seq=4)
    assert res.ok, res.report()
    assert any(k.startswith("decode:") for k in res.errors), "the cached decode step was not compared"
    expected = must_change(name, model.config, graph)
    if expected is not None:
        assert res.changed == expected, f"{name} on {model.name}: changed={res.changed}, expected {expected}"


@pytest.mark.parametrize("part", ["tower", "vq_decoder"])
@pytest.mark.parametrize("name", NAMES)
def test_every_pass_on_the_image_graphs(model, name, part):
    """The vision tower (pixels -> features) and Janus' VQ decoder (codes -> pixels): no cache, prefill only."""
    graph = model.vision.graph if part == "tower" else model.vision.vq_decoder
    if graph is None:
        pytest.skip(f"{model.name} has no VQ decoder")
    res = passes.check(pipeline_for(name), graph, model.weights, batch=2)
    assert res.ok, res.report()
    if name == "legalize" or (name == "merge_qkv" and part == "tower"):   # domain ops; q/k/v of one input
        assert res.changed, f"{name} did nothing on {model.name}'s {part}"
