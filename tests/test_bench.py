"""`dsgraph bench` on the CPU: table, JSON schema, plot, and a wrong backend flagged and never timed."""
import json

import pytest
import torch
from dsgraph.backends.base import CompiledGraph, register_backend
from dsgraph.backends.eager import EagerBackend

from dsgraph.app.bench import report, roofline
from dsgraph.app.bench.timing import buffer_count, measure
from dsgraph.app.cli import main


class BrokenBackend(EagerBackend):
    """Test-only: eager numbers with every float output scaled by 1.01 (a 1% error)."""

    name = "broken_test"

    def compile_graph(self, graph, weights, device, report, **options):
        inner = super().compile_graph(graph, weights, device, report, **options)

        def run(inputs):
            return {k: v * 1.01 if v.is_floating_point() else v for k, v in inner.run(inputs).items()}
        return CompiledGraph(graph, run, report)


register_backend("broken_test", BrokenBackend)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("DSGRAPH_CACHE_DIR", str(tmp / "cache"))
    out, png = tmp / "out.json", tmp / "out.png"
    import contextlib
    import io
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["bench", "deepseek-v3-tiny", "--device", "cpu", "--backends", "eager,broken_test,onnx,no_such",
                   "--op", "rmsnorm,moe,prefill,decode", "--batch", "1,3", "--context", "9", "--repeats", "3",
                   "--json", str(out), "--plot", str(png)])
    yield rc, stdout.getvalue(), stderr.getvalue(), json.loads(out.read_text()), png, tmp
    mp.undo()


def test_table_printed_with_progress(bench_run):
    rc, stdout, stderr, doc, _, _ = bench_run
    assert rc == 1                                   # a WRONG row makes the command fail
    assert "median ms" in stdout and "x eager" in stdout
    for label in ("rmsnorm B=1 S=9", "moe B=3 S=1", "prefill B=1 S=9", "decode B=3 T=9"):
        assert label in stdout
    assert "compiling deepseek-v3-tiny for onnx" in stderr


def test_json_follows_schema(bench_run):
    doc = bench_run[3]
    assert report.validate(doc) == []
    assert doc["environment"]["versions"]["torch"] == torch.__version__.split("+")[0] or \
        doc["environment"]["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert doc["peaks"]["bandwidth_gbs"] > 0 and doc["peaks"]["flops_tflops"]["float32"] > 0
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"eager", "onnx"}
    for r in ok:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["throughput"] == pytest.approx(r["tokens"] / (r["median_ms"] * 1e-3))
        assert r["frac_of_floor"] == pytest.approx(r["floor_ms"] / r["median_ms"])
        assert r["speedup_vs_eager"] > 0
    prefill = [r for r in ok if r["workload"] == "prefill"]
    assert prefill and all(r["ttft_ms"] == r["median_ms"] for r in prefill)


def test_schema_check_rejects_bad_documents(bench_run):
    doc = json.loads(json.dumps(bench_run[3]))
    doc["rows"][0].pop("median_ms")
    doc["rows"][1]["status"] = "fast"
    errs = report.validate(doc)
    assert any("median_ms missing" in e for e in errs) and any("'fast'" in e for e in errs)
    assert report.validate({"schema": "x"})


def test_plot_written(bench_run):
    png = bench_run[4]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrong_backend_flagged_not_timed(bench_run):
    rows = [r for r in bench_run[3]["rows"] if r["backend"] == "broken_test"]
    assert len(rows) == 6                            # rmsnorm, moe x2, prefill, decode x2: every row
    for r in rows:
        assert r["status"] == "WRONG", r
        if r["level"] == "op":
            assert r["error"] == pytest.approx(0.01, rel=1e-3)
        else:   # scaled caches feed the decode step too: the error compounds
            assert r["error"] >= 0.0099
        assert r["median_ms"] is None and r["throughput"] is None
    assert "WRONG" in bench_run[1] and "not timed" in bench_run[1]


def test_unknown_backend_reported_failed(bench_run):
    rows = [r for r in bench_run[3]["rows"] if r["backend"] == "no_such"]
    assert rows and all(r["status"] == "failed" and "unknown backend 'no_such'" in r["reason"] for r in rows)


def test_peaks_cached_per_machine(bench_run):
    tmp = bench_run[5]
    cache = json.loads((tmp / "cache" / "peaks.json").read_text())
    assert roofline.machine_key("cpu") in cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSGRAPH_CACHE_DIR", str(tmp / "cache"))
        assert roofline.peaks("cpu", ["float32"])["source"].startswith("cached")


def test_floor_picks_the_slower_bound():
    peak = {"bandwidth_gbs": 100.0, "flops_tflops": {"float32": 1.0}}
    assert roofline.floor_ms(1e9, 1e6, peak, "float32") == (pytest.approx(1.0), "compute")
    assert roofline.floor_ms(1e3, 1e9, peak, "float32") == (pytest.approx(10.0), "memory")


def test_timing_rotates_buffers_and_respects_budget():
    seen = []
    bufs = [{"x": torch.full((4,), float(i))} for i in range(3)]
    t = measure(lambda inp: seen.append(int(inp["x"][0])), bufs, "cpu", warmup=2, repeats=7)
    assert t.repeats == 7 and sorted(set(seen)) == [0, 1, 2] and t.p20_ms <= t.median_ms <= t.p80_ms
    import time
    slow = measure(lambda inp: time.sleep(0.05), bufs, "cpu", warmup=3, repeats=50, budget_s=0.2)
    assert 3 <= slow.repeats <= 4 and slow.median_ms >= 45
    assert buffer_count(1 << 30, "cpu") == 1 and buffer_count(1024, "cpu") == 8


@pytest.mark.parametrize("argv,match", [
    (["--batch", "0"], "positive integers"),
    (["--op", "flash"], "unknown workload"),
])
def test_bad_arguments_are_named(argv, match, capsys):
    try:
        rc = main(["bench", "deepseek-v3-tiny", "--backends", "eager", *argv])
    except SystemExit as e:
        rc = e.code
    assert rc != 0
    assert match in capsys.readouterr().err


def test_git_commit_from_the_environment_for_a_tree_without_git(monkeypatch, tmp_path):
    from dsgraph.app.bench.report import git_commit
    assert git_commit(tmp_path) is None
    monkeypatch.setenv("DSGRAPH_GIT_COMMIT", "0123abcd")
    assert git_commit(tmp_path) == "0123abcd"


def test_speculative_rows_carry_acceptance_and_lossy_speculation_is_wrong(monkeypatch):
    from dsgraph.app.bench import bench
    doc = bench("deepseek-v3-tiny", device="cpu", backends=["eager"], workloads=["speculative"], batches=[2],
                contexts=[6], repeats=3, log=lambda msg: None)
    assert report.validate(doc) == []
    plain, spec = doc["rows"]
    assert (plain["workload"], spec["workload"]) == ("generate", "speculative")
    assert plain["status"] == spec["status"] == "ok" and spec["label"] == "speculative B=2 S=6 N=32"
    s = spec["speculation"]
    assert len(s["acceptance_per_position"]) == 1 and 1.0 <= s["tokens_per_main_step"] <= 2.0
    assert s["speedup_vs_plain"] == pytest.approx(plain["median_ms"] / spec["median_ms"])

    import dsgraph.runtime.executable as ex  # where the Executable looks the speculative loop up
    real = ex.generate_mtp

    def lossy(*args, **kw):
        out = real(*args, **kw)
        return (out[0] + 1, *out[1:]) if isinstance(out, tuple) else out + 1
    monkeypatch.setattr(ex, "generate_mtp", lossy)
    doc = bench("deepseek-v3-tiny", device="cpu", backends=["eager"], workloads=["speculative"], batches=[1],
                contexts=[6], repeats=3, log=lambda msg: None)
    assert [r["status"] for r in doc["rows"]] == ["ok", "WRONG"]


def test_speculative_skipped_without_an_mtp_module():
    from dsgraph.app.bench import bench
    logs = []
    doc = bench("deepseek-v2-lite-tiny", device="cpu", backends=["eager"], workloads=["speculative"], log=logs.append)
    assert doc["rows"] == [] and any("no MTP module" in m for m in logs)


def test_inputs_too_large_for_free_memory_are_refused_before_allocation(monkeypatch):
    """A row whose inputs (decode caches) cannot fit is failed with the sizes, and nothing of it is drawn; rows
    that fit still run."""
    from dsgraph.app.bench import bench, runner, workloads
    drawn = []
    real = workloads.random_inputs
    monkeypatch.setattr(runner, "random_inputs", lambda graph, env, *a, **k: drawn.append(env["B"]) or
                        real(graph, env, *a, **k))
    small = 4 * 2**20
    monkeypatch.setattr(runner, "available_bytes", lambda device: small)
    doc = bench("deepseek-v3-tiny", device="cpu", backends=["eager"], workloads=["decode", "mla_decode"],
                batches=[1, 512], contexts=[64], repeats=3, log=lambda msg: None)
    rows = {(r["workload"], r["batch"]): r for r in doc["rows"]}
    for name in ("decode", "mla_decode"):
        assert rows[(name, 1)]["status"] == "ok"
        big = rows[(name, 512)]
        assert big["status"] == "failed" and "GiB is free" in big["reason"] and "--batch" in big["reason"]
    assert 512 not in drawn


def test_inputs_nbytes_matches_the_drawn_inputs():
    import dsgraph.models as models

    from dsgraph.app.bench.workloads import build_op, inputs_nbytes, random_inputs
    cfg = models.build_model("deepseek-v3-tiny", weights=False).config
    w = build_op("mla_decode", cfg, "bfloat16", {"B": 3, "T": 17})
    inputs = random_inputs(w.graph, w.env, 0, 100)
    assert inputs_nbytes(w.graph, w.env) == sum(t.numel() * t.element_size() for t in inputs.values())


def test_version_of_a_package_without_metadata_comes_from_the_module(monkeypatch):
    """A runtime-only TVM copied onto the path has no dist-info: its module's __version__ is reported."""
    import sys
    import types
    from importlib import metadata

    def missing(dist):
        raise metadata.PackageNotFoundError(dist)
    monkeypatch.setattr(report.metadata, "version", missing)
    monkeypatch.setitem(sys.modules, "tvm", types.SimpleNamespace(__version__="0.27.test"))
    assert report._version("apache-tvm") == "0.27.test" and report._version("onnxruntime-gpu") is None
    import dsgraph
    assert report._version("dsgraph") == dsgraph.__version__   # run from a checkout on PYTHONPATH


def test_triton_decode_rows_append_in_place():
    """Decode rows give a backend that grows caches in place (triton) its caches in buffers with room, rewound
    before each call: the timed step is generate's step, not a step plus a copy of every cache."""
    from dsgraph.app.bench import bench
    doc = bench("deepseek-v2-lite-tiny", device="cpu", backends=["eager", "triton"], workloads=["decode"],
                batches=[2], contexts=[8], repeats=3, log=lambda msg: None)
    rows = {r["backend"]: r for r in doc["rows"]}
    assert rows["triton"]["status"] == rows["eager"]["status"] == "ok"
    assert any("grow in place" in n for n in rows["triton"]["notes"])
    assert not any("grow in place" in n for n in rows["eager"]["notes"])


def test_json_is_rewritten_after_every_row_while_the_run_goes_on(monkeypatch, tmp_path):
    """A stopped run keeps its rows: each row rewrites the partial document (complete: false), the end the
    final one (complete: true)."""
    from dsgraph.app.bench import bench
    seen = []
    real = report.write_json

    def spy(path, doc):
        real(path, doc)
        seen.append((len(doc["rows"]), doc["complete"], json.loads(open(path).read())["complete"]))
    monkeypatch.setattr(report, "write_json", spy)
    path = tmp_path / "partial.json"
    doc = bench("deepseek-v3-tiny", device="cpu", backends=["eager", "onnx"], workloads=["rmsnorm", "rope"],
                batches=[1], contexts=[8], repeats=3, log=lambda msg: None, partial_json=path)
    assert [n for n, _, _ in seen] == list(range(1, len(doc["rows"]) + 1))
    assert all(c is False and on_disk is False for _, c, on_disk in seen)
    assert doc["complete"] is True and report.validate(doc) == []
    assert report.validate({**doc, "complete": "yes"}) == ["complete must be true or false"]


def test_w8a8_graphs_are_checked_at_the_activation_quantisation_tolerance():
    """A backend whose FP8 GEMMs quantise activations (DeepSeek's W8A8) is within a few percent by design."""
    from dsgraph.backends.base import CompileReport, KernelChoice

    from dsgraph.numerics import W8A8_TOLERANCE, tolerance
    report = CompileReport("triton", "cuda", "bfloat16")
    report.kernels.append(KernelChoice(("y",), "linear_fp8", "template", "fp8_gemm", "w8a16"))
    assert tolerance("bfloat16", report=report) == 3e-2 and tolerance("bfloat16", "model", report) == 6e-2
    report.kernels.append(KernelChoice(("z",), "linear_fp8", "template", "fp8_gemm",
                                       "w8a8, per-token-group activation quantisation"))
    assert tolerance("bfloat16", report=report) == W8A8_TOLERANCE


def test_dsa_decode_rows_beside_dense_mla():
    """V3.2's sparse decode attention (indexer + top-k + sparse MLA) and dense MLA at the same context, one run."""
    from dsgraph.app.bench import bench
    doc = bench("deepseek-v3.2-tiny", device="cpu", backends=["eager", "triton"],
                workloads=["dsa_decode", "mla_decode"], batches=[2], contexts=[16], repeats=1, log=lambda msg: None)
    rows = {(r["workload"], r["backend"]): r for r in doc["rows"]}
    assert all(rows[(w, be)]["status"] == "ok" for w in ("dsa_decode", "mla_decode") for be in ("eager", "triton"))
    said = []
    bench("deepseek-v3-tiny", device="cpu", backends=["eager"], workloads=["dsa_decode"], batches=[1], contexts=[8],
          repeats=1, log=said.append)
    assert any("skip dsa_decode: the model has no DeepSeek Sparse Attention" in m for m in said)
