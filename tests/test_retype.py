"""`retype` gives the graph the model builder makes in that dtype, on every tiny preset and in both directions."""
import pytest

from dsgraph import models, passes
from dsgraph.errors import PassError
from dsgraph.numerics import tolerance


@pytest.mark.parametrize("name", models.TINY_PRESETS)
@pytest.mark.parametrize("src,dst", [("float32", "bfloat16"), ("bfloat16", "float32"), ("float16", "bfloat16")])
def test_retype_equals_building_in_that_dtype(name, src, dst):
    cfg = models.build_model(name, weights=False).config
    built = models.build_graph(cfg, src, name="m")
    out = passes.get("retype", dtype=dst)(built).graph
    passes.assert_structural_equal(out, models.build_graph(cfg, dst, name="m"))
    assert out.meta["dtype"] == dst and built.meta["dtype"] == src  # the input graph is untouched


def test_retype_is_proven_and_refuses_what_it_cannot_do():
    m = models.build_model("deepseek-v3-fp8-tiny")
    # fp16 keeps 10 mantissa bits: the retyped graph computes the same model within the whole-model tolerance
    passes.check(("retype", {"dtype": "float16"}), m.graph, m.weights, rtol=tolerance("float16", "model")) \
        .raise_if_failed()
    g = m.graph.copy()
    del g.meta["dtype"]
    with pytest.raises(PassError, match="records no compute dtype"):
        passes.get("retype", dtype="bfloat16")(g)
    with pytest.raises(PassError, match="not a float dtype"):
        passes.get("retype", dtype="int64")(m.graph)
