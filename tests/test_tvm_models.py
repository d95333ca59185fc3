"""The TVM backend end to end on llvm: every tiny preset against eager (prefill, a decode step on the cache,
greedy tokens), an artifact reloaded in a fresh process whose TVM has no compiler library, and the errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

tvm = pytest.importorskip("tvm")

from dsgraph.backends import get_backend  # noqa: E402
from dsgraph.backends.optional import optional  # noqa: E402
from dsgraph.backends.tvm import env  # noqa: E402

import dsgraph  # noqa: E402
from dsgraph import models  # noqa: E402
from dsgraph.builder import GraphBuilder  # noqa: E402
from dsgraph.errors import ArtifactError, BackendUnavailable, DSGraphError, InputError, UnknownOpError  # noqa: E402
from dsgraph.ops import defop, scratch_ops  # noqa: E402
from tests.test_tvm_ops import check, compile_tvm, rel  # noqa: E402

NOT_V4 = [p for p in models.TINY_PRESETS if p != "deepseek-v4-tiny"]

ROOT = Path(__file__).resolve().parents[1]
_BUILT: dict = {}


def built(name):
    """One build per preset for the whole module: (model, tvm executable, eager executable)."""
    if name not in _BUILT:
        m = models.build_model(name, seed=0)
        _BUILT[name] = (m, dsgraph.compile(m, backend="tvm", device="cpu"),
                        dsgraph.compile(m, backend="eager", device="cpu", passes="none"))
    return _BUILT[name]


@pytest.mark.parametrize("name", NOT_V4)   # V4 runs with reported fallbacks: tests/test_v4_backends.py
def test_tiny_preset_matches_eager(name):
    m, exe, ref = built(name)
    assert exe.compiled.report.counts().get("fallback", 0) == 0, exe.report()
    ids = torch.randint(0, m.config.vocab_size, (2, 5))
    l1, s1 = exe.prefill(ids)
    l0, s0 = ref.prefill(ids)
    assert rel(l1, l0) <= 1e-4
    tok = l0[:, -1].argmax(-1, keepdim=True)
    d1, s1 = exe.decode(tok, s1)
    d0, s0 = ref.decode(tok, s0)
    assert rel(d1, d0) <= 1e-4
    for k in set(s0.caches) & set(s1.caches):  # absorbed MLA keeps a latent cache instead of per-head K/V
        assert rel(s1.caches[k], s0.caches[k]) <= 1e-4, k
    assert torch.equal(exe.generate(ids[:1, :3], max_new_tokens=4), ref.generate(ids[:1, :3], max_new_tokens=4))


def test_report_names_kernels_and_build():
    _, exe, _ = built("deepseek-v3-tiny")
    text = exe.report()
    for what in ("te.mla_absorbed", "te.moe_route (sigmoid, noaux_tc, bias", "te.moe_grouped_gemm",
                 "te.rope (interleaved", "relax.nn.rms_norm", "build", "module.so"):
        assert what in text, what
    assert exe.compiled.report.passes  # the passes' tvm pipeline ran (absorbed MLA, grouped MoE above)


def runtime_only_tvm(dst: Path) -> Path:
    """A view of the installed tvm package without libtvm_compiler.so: TVM then loads its runtime alone."""
    src = Path(tvm.__file__).parent
    pkg = dst / "tvm"
    (pkg / "lib").mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name not in ("lib", "__pycache__"):
            (pkg / entry.name).symlink_to(entry)
    for lib in (src / "lib").iterdir():
        if "compiler" not in lib.name:
            (pkg / "lib" / lib.name).symlink_to(lib)
    return dst


LOADER = """
import json, sys, torch, tvm
import dsgraph
maps = open("/proc/self/maps").read()
exe = dsgraph.load_artifact(sys.argv[1])
ids = torch.load(sys.argv[2])
logits, state = exe.prefill(ids)
step, _ = exe.decode(logits[:, -1].argmax(-1, keepdim=True), state)
torch.save({"prefill": logits, "decode": step}, sys.argv[3])
print(json.dumps({"runtime_only": tvm.base._RUNTIME_ONLY, "libs": sorted(tvm.base._LOADED_LIBS),
                  "compiler_mapped": "libtvm_compiler" in maps + open("/proc/self/maps").read(),
                  "relax_imported": "tvm.relax" in sys.modules, "tvm_file": tvm.__file__}))
"""


def test_artifact_runs_with_runtime_only_tvm(tmp_path):
    m, exe, ref = built("deepseek-v3-tiny")
    exe.save(tmp_path / "art")
    assert (tmp_path / "art" / "backend" / "main" / "module.so").exists()
    ids = torch.randint(0, m.config.vocab_size, (2, 4))
    torch.save(ids, tmp_path / "ids.pt")
    view = runtime_only_tvm(tmp_path / "site")
    envv = {**os.environ, "PYTHONPATH": os.pathsep.join([str(view), str(ROOT)]), "TVM_LIBRARY_PATH": ""}
    envv.pop("TVM_LIBRARY_PATH")
    proc = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "art"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], env=envv, cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["runtime_only"] and "tvm_compiler" not in info["libs"] and not info["compiler_mapped"], info
    assert not info["relax_imported"] and info["tvm_file"].startswith(str(view)), info
    out = torch.load(tmp_path / "out.pt")
    logits, state = exe.prefill(ids)
    step, _ = exe.decode(logits[:, -1].argmax(-1, keepdim=True), state)
    assert torch.equal(out["prefill"], logits) and torch.equal(out["decode"], step)
    assert rel(out["prefill"], ref.prefill(ids)[0]) <= 1e-4


# ------------------------------------------------------------------------------------------------ errors and fallbacks
@pytest.fixture
def test_ops():
    """Two ops that exist only during a test (the registry is global: other tests check its completeness)."""
    with scratch_ops():
        nolower = defop("test.tvm_no_lowering", "x", doc="an op with no TVM lowering and no decomposition",
                        level="domain")
        nolower.infer(lambda x: x)
        nolower.reference(lambda x: x * 3)
        legal = defop("test.tvm_legalized", "x", doc="an op TVM lowers only through its decomposition",
                      level="domain")
        legal.infer(lambda x: x)
        legal.reference(lambda x: torch.tanh(x) * x)
        legal.decomposition(lambda b, x: b.mul(b.tanh(x), x))
        yield


def _one_op_graph(op):
    b = GraphBuilder("one")
    x = b.input("x", ("B", 5), "float32")
    b.output("y", b.op(op, b.exp(x)))
    return b.build()


def test_unknown_op_is_named(test_ops):
    with pytest.raises(UnknownOpError, match="test.tvm_no_lowering"):
        compile_tvm(_one_op_graph("test.tvm_no_lowering"), {})


def test_declined_lowering_is_an_error_with_its_reason():
    """The cast lowering declines casts to FP8; with the table's "error" fallback that names the node and why."""
    b = GraphBuilder("to_fp8")
    b.output("y", b.cast(b.input("x", ("B", 5), "float32"), dtype="float8_e4m3fn"))
    with pytest.raises(UnknownOpError, match=r"cannot lower %cast = cast.*float8_e4m3fn is not supported"):
        compile_tvm(b.build(), {})


def test_missing_optional_dependency_names_its_extra():
    """The compiler half names TVM's modules at import (backends/optional.py); a missing one fails at first use."""
    missing = optional("dsgraph_test_absent_module", extra="tvm")
    assert "not imported yet" in repr(missing)
    with pytest.raises(BackendUnavailable, match=r"pip install 'dsgraph\[tvm\]'"):
        missing.anything


def test_legalized_op_is_a_reported_fallback(test_ops):
    g = _one_op_graph("test.tvm_legalized")
    c = compile_tvm(g, {})
    fb = c.report.fallbacks
    assert fb and all("legalized test.tvm_legalized" in k.note for k in fb), c.report
    assert any("legalized without a TVM kernel: test.tvm_legalized" in n for n in c.report.notes)
    check(c, c.graph, {}, {"x": torch.randn(3, 5)})


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setattr(env, "find_nvcc", lambda: None)
    assert "nvcc" in env.unavailable_reason("cuda")
    with pytest.raises(BackendUnavailable, match="nvcc"):
        get_backend("tvm").compile(_one_op_graph("exp"), {}, device="cuda")
    assert "unknown device" in env.unavailable_reason("tpu")
    real = env.importlib.util.find_spec
    monkeypatch.setattr(env.importlib.util, "find_spec", lambda n, *a: None if n == "tvm" else real(n, *a))
    assert "pip install apache-tvm" in env.unavailable_reason("cpu")


def test_runtime_errors(tmp_path):
    g = _one_op_graph("exp")
    be = get_backend("tvm")
    c = compile_tvm(g, {})
    with pytest.raises(InputError, match="missing"):
        c.run({})
    be.save_compiled(c, tmp_path / "m")
    program = json.loads((tmp_path / "m" / "program.json").read_text())
    (tmp_path / "m" / "program.json").write_text(json.dumps({**program, "device": "cuda"}))
    with pytest.raises(ArtifactError, match="built for cuda"):
        be.load_compiled(tmp_path / "m", g, {}, "cpu", "float32")


def test_bench_runs_prebuilt_modules_with_runtime_only_tvm(tmp_path):
    """`dsgraph bench --prebuild` builds here; `--prebuilt` runs those modules where TVM is runtime-only (the GPU
    machine's situation), and a graph nobody prebuilt is a failed row naming the command that builds it."""
    from dsgraph.app.bench import prebuild_tvm
    shape = ["--op", "rmsnorm,decode,speculative", "--batch", "1", "--context", "6"]
    names = prebuild_tvm("deepseek-v3-tiny", tmp_path / "pb", device="cpu", workloads=["rmsnorm", "decode",
                         "speculative"], batches=[1], contexts=[6], log=lambda msg: None)
    assert len(names) == 4   # the rmsnorm op graph, the model, the speculative main graph and its MTP branch
    view = runtime_only_tvm(tmp_path / "site")
    envv = {**os.environ, "PYTHONPATH": os.pathsep.join([str(view), str(ROOT)])}
    envv.pop("TVM_LIBRARY_PATH", None)

    def bench(*extra):
        out = tmp_path / "out.json"
        proc = subprocess.run([sys.executable, "-m", "dsgraph.app.cli", "bench", "deepseek-v3-tiny", "--device", "cpu",
                               "--backends", "eager,tvm", *shape, "--repeats", "3", "--prebuilt", str(tmp_path / "pb"),
                               "--json", str(out), *extra], env=envv, cwd=tmp_path, capture_output=True, text=True,
                              timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [r for r in json.loads(out.read_text())["rows"] if r["backend"] == "tvm"]

    rows = bench()
    assert [r["status"] for r in rows] == ["ok"] * 4, [r["reason"] for r in rows]
    rows = bench("--dtype", "bfloat16")   # other graphs: nothing prebuilt for them
    assert rows and all(r["status"] == "failed" and "no prebuilt TVM module" in r["reason"] and "--prebuild" in
                        r["reason"] for r in rows), [r["reason"] for r in rows]


def test_localize_is_a_clear_error_on_a_whole_module_backend():
    m, exe, _ = built("deepseek-v3-tiny")
    with pytest.raises(DSGraphError, match=r"tvm backend .* cannot record .*triton or eager"):
        exe.localize(torch.randint(0, m.config.vocab_size, (1, 3)))
