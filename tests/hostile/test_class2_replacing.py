"""Class 2: `--overwrite` replaces only an artifact dsgraph wrote, atomically, one writer at a time; a killed
write leaves nothing that loads and nothing that piles up."""
import json
import socket
import subprocess
import threading

import dsgraph.models as models
import pytest

import dsgraph
from dsgraph.app.cli import main
from dsgraph.errors import ArtifactError
from hostile.helpers import copy, tree


@pytest.fixture(scope="module")
def exe():
    return dsgraph.compile(models.build_model("deepseek-llm-tiny", seed=3), backend="eager")


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def user_dir(tmp_path, kind):
    d = tmp_path / "mine"
    if kind == "file":
        d.write_text("my notes")
        return d
    d.mkdir()
    if kind == "files":
        (d / "thesis.tex").write_text("years of work")
        (d / "sub").mkdir()
        (d / "sub" / "data.csv").write_text("1,2")
    elif kind == "foreign-manifest":
        (d / "manifest.json").write_text(json.dumps({"format": "something-else", "files": {}}))
    elif kind == "garbage-manifest":
        (d / "manifest.json").write_text("{not json")
    return d


@pytest.mark.parametrize("kind", ["files", "empty", "file", "foreign-manifest", "garbage-manifest"])
def test_overwrite_refuses_what_is_not_an_artifact(exe, tmp_path, kind):
    d = user_dir(tmp_path, kind)
    before = tree(tmp_path)
    content = d.read_text() if d.is_file() else None
    with pytest.raises(ArtifactError, match="not a dsgraph artifact|not a directory dsgraph wrote"):
        exe.save(d, overwrite=True)
    assert tree(tmp_path) == before
    if content is not None:
        assert d.read_text() == content


def test_overwrite_refuses_an_artifact_holding_user_files(exe, eager_artifact, tmp_path):
    art = copy(eager_artifact, tmp_path)
    (art / "my_notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="does not list"):
        exe.save(art, overwrite=True)
    assert (art / "my_notes.txt").read_text() == "keep me"


def test_overwrite_replaces_an_artifact(exe, eager_artifact, tmp_path):
    art = copy(eager_artifact, tmp_path)
    exe.save(art, overwrite=True)
    assert dsgraph.load_artifact(art).model.graph.name == exe.graph.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temp dir, old copy or lock left


def test_cli_overwrite_of_a_user_dir_is_one_line(tmp_path, capsys):
    d = user_dir(tmp_path, "files")
    assert main(["compile", "deepseek-llm-tiny", "-o", str(d), "--overwrite"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]  # beside log lines
    assert len(err) == 1 and "not a dsgraph artifact" in err[0] and "Traceback" not in err[0]
    assert (d / "thesis.tex").read_text() == "years of work"


def test_live_lock_refuses_a_second_writer(exe, tmp_path):
    (tmp_path / ".a.lock").write_text(f"1@{socket.gethostname()}")  # pid 1 is always alive
    with pytest.raises(ArtifactError, match="being written by another dsgraph process"):
        exe.save(tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_stale_lock_is_taken_over(exe, tmp_path):
    (tmp_path / ".a.lock").write_text(f"{dead_pid()}@{socket.gethostname()}")
    exe.save(tmp_path / "a")
    assert (tmp_path / "a" / "manifest.json").exists() and not (tmp_path / ".a.lock").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_concurrent_writers_one_wins_cleanly(exe, tmp_path, overwrite):
    errors = []

    def save():
        try:
            exe.save(tmp_path / "a", overwrite=overwrite)
        except ArtifactError as e:
            errors.append(e)
    threads = [threading.Thread(target=save) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) <= 2
    assert dsgraph.load_artifact(tmp_path / "a").graph.name == exe.graph.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_killed_write_leaves_nothing_loadable_and_is_cleaned(exe, tmp_path):
    pid = dead_pid()
    stale = tmp_path / f".a.dsgraph-tmp-{pid}-xyz"
    stale.mkdir()
    (stale / ".dsgraph-partial").write_text(f"{pid}@{socket.gethostname()}")
    (stale / "manifest.json").write_text("{}")
    with pytest.raises(ArtifactError, match="did not finish"):
        dsgraph.load_artifact(stale)
    not_ours = tmp_path / f".a.dsgraph-tmp-{pid}-abc"  # a look-alike without our marker: never deleted
    not_ours.mkdir()
    (not_ours / "x").write_text("x")
    exe.save(tmp_path / "a")
    assert not stale.exists() and not_ours.exists()
