"""Deployable artifacts: round trip in a fresh process, integrity errors, atomic writes."""
import json
import subprocess
import sys
import textwrap

import dsgraph.models as models
import pytest
import torch

import dsgraph
from dsgraph.errors import ArtifactError

PROMPT = [[3, 14, 15, 92, 65]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    exe = dsgraph.compile(models.build_model("deepseek-v3-tiny", seed=2), backend="eager")
    path = exe.save(tmp_path_factory.mktemp("art") / "v3")
    return exe, path


ROUND_TRIPS = [("eager", "deepseek-v3-tiny"), ("triton", "deepseek-v3-tiny"), ("triton", "deepseek-v2-lite-tiny"),
               ("tvm", "deepseek-v3-tiny"), ("tvm", "deepseek-v2-lite-tiny")]


@pytest.mark.parametrize("backend,preset", ROUND_TRIPS)
def test_round_trip_in_fresh_process(backend, preset, tmp_path):
    from dsgraph.backends import available_backends
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} backend unavailable here")
    exe = dsgraph.compile(models.build_model(preset, seed=2), backend=backend, device="cpu")
    path = exe.save(tmp_path / "art")
    ids = torch.tensor(PROMPT)
    torch.save({"logits": exe(ids), "tokens": exe.generate(ids, 4)}, tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import torch, dsgraph
        exe = dsgraph.load_artifact({str(path)!r})
        assert exe.compiled.report.backend == {backend!r}
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        ids = torch.tensor({PROMPT})
        assert torch.equal(exe(ids), ref["logits"]), "logits differ"
        assert torch.equal(exe.generate(ids, 4), ref["tokens"]), "tokens differ"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


@pytest.mark.parametrize("backend,pattern", [("triton", "backend/main/generated/*.py"), ("tvm", "backend/main/*.so")])
def test_deleted_kernel_file_refused(backend, pattern, tmp_path):
    from dsgraph.backends import available_backends
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} backend unavailable here")
    exe = dsgraph.compile(models.build_model("deepseek-llm-tiny"), backend=backend, device="cpu")
    path = exe.save(tmp_path / "art")
    victims = sorted(path.glob(pattern))
    assert victims, f"no {pattern} in the {backend} artifact"
    victims[0].unlink()
    with pytest.raises(ArtifactError, match=f"{victims[0].name} is missing"):
        dsgraph.load_artifact(path)


def test_manifest_describes_the_artifact(saved):
    _, path = saved
    m = json.loads((path / "manifest.json").read_text())
    assert m["backend"] == "eager" and m["device"] == "cpu" and m["dtype"] == "float32"
    assert m["model"]["config"]["model_type"] == "deepseek_v3" and len(m["graph_hash"]) == 64
    assert {"graph.json", "weights.safetensors"} <= set(m["files"])
    assert any(p[0] == "prune_mtp" for p in m["passes"])


def _copy(path, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_corrupted_weights_refused(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    data = bytearray((dst / "weights.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (dst / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.safetensors.*checksum"):
        dsgraph.load_artifact(dst)


def test_truncated_and_missing_files_refused(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    (dst / "graph.json").write_text((dst / "graph.json").read_text()[:100])
    with pytest.raises(ArtifactError, match="graph.json"):
        dsgraph.load_artifact(dst)
    (dst / "graph.json").unlink()
    with pytest.raises(ArtifactError, match="graph.json is missing"):
        dsgraph.load_artifact(dst)


def test_newer_format_and_wrong_target_refused(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    with pytest.raises(ArtifactError, match="backend 'eager', not 'tvm'"):
        dsgraph.load_artifact(dst, backend="tvm")
    with pytest.raises(ArtifactError, match="device 'cpu', not 'cuda'"):
        dsgraph.load_artifact(dst, device="cuda")
    m["format_version"] = 99
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="newer"):
        dsgraph.load_artifact(dst)


def test_crash_mid_save_leaves_nothing(tmp_path, monkeypatch):
    import dsgraph.runtime.artifact as art
    exe = dsgraph.compile(models.build_model("deepseek-llm-tiny"), backend="eager")

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(art, "_save_weights", boom)
    with pytest.raises(RuntimeError):
        exe.save(tmp_path / "a")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ArtifactError, match="not a dsgraph artifact"):
        dsgraph.load_artifact(tmp_path)


def test_existing_directory_needs_overwrite(saved, tmp_path):
    exe, _ = saved
    exe.save(tmp_path / "x")
    with pytest.raises(ArtifactError, match="already exists"):
        exe.save(tmp_path / "x")
    exe.save(tmp_path / "x", overwrite=True)
    assert (tmp_path / "x" / "manifest.json").exists()
