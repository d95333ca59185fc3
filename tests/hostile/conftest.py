"""Fixtures of the hostile-input tests: small saved artifacts to damage (copied per test) and a fresh kernel cache."""

import dsgraph.models as models
import pytest

import dsgraph


@pytest.fixture(scope="session")
def eager_artifact(tmp_path_factory):
    exe = dsgraph.compile(models.build_model("deepseek-llm-tiny", seed=1), backend="eager")
    return exe.save(tmp_path_factory.mktemp("eager") / "art")


@pytest.fixture(scope="session")
def triton_artifact(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DSGRAPH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    exe = dsgraph.compile(models.build_model("deepseek-llm-tiny", seed=1), backend="triton", device="cpu")
    path = exe.save(tmp_path_factory.mktemp("triton") / "art")
    mp.undo()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh kernel cache, and no kernel imported by this process yet."""
    from dsgraph.backends.triton.codegen import source
    monkeypatch.setenv("DSGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(source, "_LOADED", {})
    return tmp_path / "cache"
