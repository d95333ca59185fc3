"""ONNX export: every tiny preset's prefill entry as standard ONNX, run by ONNX Runtime, equal to eager."""
import dsgraph.models as models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dsgraph.backends.onnx.export import export_onnx, save_onnx

import dsgraph
from dsgraph.app.check import check_backend, rel_err
from dsgraph.builder import GraphBuilder
from dsgraph.errors import UnknownOpError
from dsgraph.interpreter import run
from dsgraph.ops import defop, scratch_ops
from dsgraph.weights import WeightStore

TOL = 1e-4


def _ort(model_or_path):
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


def _feeds(graph, b, s, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, graph.meta["vocab_size"], (b, s), generator=g)
    feeds = {"input_ids": ids, "positions": torch.arange(s).expand(b, s).contiguous()}
    for name, v in graph.caches().items():
        feeds[name] = torch.zeros(v.type.concrete({"B": b, "T": 0}))
    return feeds


@pytest.mark.parametrize("preset", models.TINY_PRESETS)
def test_prefill_export_matches_eager(preset, tmp_path):
    model = models.build_model(preset, mtp=False)
    proto = export_onnx(model.graph, model.weights)
    path = save_onnx(proto, tmp_path / "m.onnx")          # runs onnx.checker
    loaded = onnx.load(str(path))
    assert all(o.domain in ("", "ai.onnx") and o.version >= 17 for o in loaded.opset_import)
    assert {n.domain for n in loaded.graph.node} <= {""}
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in loaded.graph.input}
    grows = next(n for n, v in model.graph.caches().items() if "T" in map(str, v.type.shape))  # V4: cache.tokens
    assert dims["input_ids"] == ["B", "S"] and dims[grows][:2] == ["B", "T"]
    assert {t.name for t in loaded.graph.initializer} >= set(model.graph.params())
    sess = _ort(str(path))
    for b, s, seed in ((1, 1, 0), (3, 7, 1)):               # one graph, several batch sizes and lengths
        feeds = _feeds(model.graph, b, s, seed)
        want = run(model.graph, model.weights, feeds)
        got = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {k: v.numpy() for k, v in feeds.items()})))
        for name, ref in want.items():
            assert rel_err(torch.from_numpy(got[name]), ref) <= TOL, (preset, name, b, s)


def test_backend_decodes_with_cache_like_eager():
    r = check_backend(models.build_model("deepseek-v2-lite-tiny", mtp=False), "onnx")
    assert r.ok and r.tokens_match, r
    moe = models.build_model("deepseek-moe-tiny", mtp=False)
    report = str(dsgraph.compile(moe, backend="onnx").report())   # default passes: grouped MoE
    assert "group_moe" in report and "moe.grouped_gemm" in report and "decomposed into primitives" in report
    report = str(dsgraph.compile(moe, backend="onnx", passes="none").report())
    assert "onnxruntime" in report and "exported dense" in report and "fallbacks: 0" in report


def test_mtp_branch_exports_through_its_decomposition():
    model = models.build_model("deepseek-v3-tiny")             # with the MTP module
    records = []
    proto = export_onnx(model.graph, model.weights, records=records)
    assert any(node.op == "mtp.branch" and res.note == "decomposed into primitives" for node, res in records)
    feeds = _feeds(model.graph, 2, 4, 3)
    feeds["mtp_ids"] = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(4))
    want = run(model.graph, model.weights, feeds)
    got = dict(zip([o.name for o in proto.graph.output], _ort(proto).run(None, {k: v.numpy() for k, v in
                                                                                 feeds.items()})))
    assert rel_err(torch.from_numpy(got["mtp_logits"]), want["mtp_logits"]) <= TOL


def _primitive_graph():
    """Many primitives in one graph over symbolic [B, S, 6] inputs (index ops, shapes, reductions)."""
    b = GraphBuilder("prims")
    x = b.input("x", ("B", "S", 6), "float32")
    y = b.input("y", ("B", "S", 6), "float32")
    idx = b.input("idx", ("B", "S", 2))
    w = b.param("w", (5, 6))
    h = b.linear(x, w)                                                   # [B,S,5]
    h = b.gelu(b.sub(b.mul(h, b.sigmoid(h)), b.div(h, b.add(b.abs(h), b.constant(value=1.0)))), approximate="tanh")
    r = b.reshape(b.concat(x, y, dim=-1), shape=("B*S", 12))
    p = b.permute(b.reshape(r, shape=("B", "S", 3, 4)), dims=(0, 2, 1, 3))         # [B,3,S,4]
    sm = b.softmax(b.einsum(p, p, equation="bhsd,bhtd->bhst"), dim=-1)            # [B,3,S,S]
    mask = b.causal_mask(x, y)
    sm = b.where(mask, sm, b.expand(b.constant(value=0.0, shape=(1, 1)), shape=("S", "S")))
    vals, top = b.topk(x, k=2)
    g = b.gather(x, idx, dim=2)
    sc = b.scatter(x, idx, g, dim=2)
    lo, hi = b.split(y, sizes=(2, 4), dim=-1)
    ia = b.index_add(hi, b.arange_like(lo, dim=2), b.exp(b.neg(lo)), dim=2)
    last = b.slice(b.rsqrt(b.add(b.pow(y, exponent=2.0), b.constant(value=0.5))), dim=1, start=-1)
    red = b.add(b.sum(sm, dims=(-1,)), b.mean(b.amax(sm, dims=(1,), keepdim=True), dims=(-1,)))
    flat = b.reshape(x, shape=("B*S", 6))
    sel = b.index_select(flat, b.reshape(b.argmax(y, dim=-1), shape=("B*S",)), dim=1)
    for name, v in dict(h=h, sm=sm, vals=vals, top=top, sc=sc, ia=ia, last=last, red=red, sel=sel,
                        cast=b.cast(b.maximum(x, y), dtype="float64"), cmp=b.lt(x, y), silu=b.silu(b.tanh(x)),
                        trig=b.add(b.cos(x), b.sin(y)), log=b.log(b.add(b.sqrt(b.abs(x)), b.constant(value=1.0))),
                        mm=b.matmul(x, b.permute(y, dims=(0, 2, 1))), mn=b.minimum(x, y)).items():
        b.output(name, v)
    return b.build()


@pytest.mark.parametrize("bsz,seq", [(1, 1), (2, 5), (3, 9)])
def test_primitive_converters_match_reference(bsz, seq):
    graph = _primitive_graph()
    weights = WeightStore({"w": torch.randn(5, 6, generator=torch.Generator().manual_seed(7))})
    g = torch.Generator().manual_seed(bsz * 10 + seq)
    feeds = {"x": torch.randn(bsz, seq, 6, generator=g), "y": torch.randn(bsz, seq, 6, generator=g),
             "idx": torch.randint(0, 6, (bsz, seq, 2), generator=g)}
    want = run(graph, weights, feeds)
    proto = export_onnx(graph, weights)
    onnx.checker.check_model(proto)
    got = dict(zip([o.name for o in proto.graph.output], _ort(proto).run(None, {k: v.numpy() for k, v in
                                                                                 feeds.items()})))
    for name, ref in want.items():
        out = torch.from_numpy(np.asarray(got[name]))
        if ref.is_floating_point():
            assert rel_err(out, ref) <= 1e-5, name
        else:
            assert torch.equal(out, ref), name


def test_op_without_converter_or_decomposition_is_named():
    with scratch_ops():  # other tests walk the registry
        noconv = defop("test_onnx.no_converter", "x", doc="an op with neither an ONNX converter nor a decomposition")
        noconv.infer(lambda x: x)
        noconv.reference(lambda x: x)
        b = GraphBuilder("noconv")
        b.output("y", b.op("test_onnx.no_converter", b.input("x", ("N", 4), "float32")))
        with pytest.raises(UnknownOpError, match="test_onnx.no_converter"):
            export_onnx(b.build(), WeightStore())


@pytest.mark.parametrize("tokens", [1, 5, 13])
def test_grouped_moe_exports_through_decompositions(tokens):
    """group_moe's permute / grouped GEMM / unpermute lower via argsort, bincount and cumsum converters."""
    from dsgraph.passes import run_pipeline

    from dsgraph.app.bench.workloads import build_op
    cfg = models.build_model("deepseek-v3-tiny", weights=False).config
    w = build_op("moe", cfg, "float32", {"B": tokens, "S": 1})
    graph, weights, _ = run_pipeline(w.graph, w.weights, ["group_moe"])
    assert graph.find("moe.permute") and graph.find("moe.grouped_gemm")
    x = torch.randn(tokens, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(tokens))
    want = run(graph, weights, {"x": x})["out"]
    got = _ort(export_onnx(graph, weights)).run(None, {"x": x.numpy()})[0]
    assert rel_err(torch.from_numpy(got), want) <= 1e-5


def test_export_cli_writes_a_loadable_file(tmp_path, capsys):
    from dsgraph.app.cli import main
    out = tmp_path / "llm.onnx"
    assert main(["export", "deepseek-llm-tiny", "--onnx", str(out)]) == 0
    assert "opset 21" in capsys.readouterr().out
    sess = _ort(str(out))
    assert [i.name for i in sess.get_inputs()][:2] == ["input_ids", "positions"]
    assert "logits" in [o.name for o in sess.get_outputs()]
