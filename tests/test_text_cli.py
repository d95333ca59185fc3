"""The text command line: `dsgraph run CKPT --prompt` streams transformers' greedy text, an artifact carries its
tokenizer into a fresh process, `dsgraph chat`, `dsgraph list`, `--version`, no abbreviated options."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import test_generation as tg

import dsgraph
from dsgraph.app.cli import main
from dsgraph.errors import ArtifactError

_one_thread = tg._one_thread


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tg.Checkpoint(tmp_path_factory.mktemp("clickpt"))


def test_run_prompt_streams_transformers_greedy_text(ckpt, capsys):
    _, text = ckpt.hf_text(tg.PROMPTS[1])
    assert main(["run", str(ckpt.path), "--prompt", tg.PROMPTS[1], "--temperature", "0",
                 "--max-new-tokens", str(tg.NEW)]) == 0
    out = capsys.readouterr()
    assert out.out == text + "\n"
    assert "tokens] ttft" in out.err and "tok/s" in out.err


def test_artifact_runs_text_in_a_fresh_process(ckpt, tmp_path, capsys):
    _, text = ckpt.hf_text(tg.PROMPTS[0])
    assert main(["compile", str(ckpt.path), "-o", str(tmp_path / "art")]) == 0
    assert (tmp_path / "art" / "tokenizer" / "tokenizer.json").exists()
    proc = subprocess.run([sys.executable, "-m", "dsgraph", "run", str(tmp_path / "art"), "--prompt", tg.PROMPTS[0],
                           "--temperature", "0", "--max-new-tokens", str(tg.NEW), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == text + "\n" and proc.stderr.startswith("[eos after")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert {"tokenizer/tokenizer.json", "tokenizer/generation_config.json"} <= set(manifest["files"])
    cfg = tmp_path / "art" / "tokenizer" / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("Unknown role", "Unknown r0le"))      # an edited chat template
    with pytest.raises(ArtifactError, match="tokenizer/tokenizer_config.json"):
        dsgraph.load_artifact(str(tmp_path / "art"))


def test_chat_keeps_the_conversation(ckpt, monkeypatch, capsys):
    lines = iter(["hello", "/reset", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    assert main(["chat", str(ckpt.path), "--temperature", "0", "--max-new-tokens", "4", "--system", "brief"]) == 0
    assert capsys.readouterr().err.count("tokens] ttft") == 2


def test_list_version_and_no_abbreviations(capsys):
    assert main(["list", "presets"]) == 0 and "deepseek-v3-tiny" in capsys.readouterr().out
    assert main(["list", "passes"]) == 0 and "absorb_mla" in capsys.readouterr().out
    assert main(["list", "backends"]) == 0 and "eager" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("dsgraph ")
    with pytest.raises(SystemExit):
        main(["run", "deepseek-llm-tiny", "--prompt-i", "1,2"])    # no silent --prompt-ids
    assert "unrecognized arguments" in capsys.readouterr().err
    assert main(["run", "deepseek-llm-tiny", "--chat"]) == 2  # a user error (cli_guard.py)
    assert "take a text --prompt" in capsys.readouterr().err


def test_tiny_preset_prompt_goes_through_its_tokenizer(capsys):
    assert main(["run", "deepseek-v3-tiny", "--prompt", "Hello!", "--temperature", "0",
                 "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "[length after 5 tokens]" in out.err


def test_dtype_auto_and_keep_fp8_flags(ckpt, tmp_path, capsys):
    from dsgraph.app import api
    cfg = json.loads((ckpt.path / "config.json").read_text())
    want = cfg.get("torch_dtype") or cfg.get("dtype")
    assert dsgraph.load(str(ckpt.path), dtype="auto").graph.meta["dtype"] == want
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float8_e4m3fn"}))
    assert api._config_dtype(tmp_path / "config.json") == "bfloat16"    # FP8 checkpoints compute in bf16
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert api._config_dtype(tmp_path / "config.json") == "bfloat16"
    assert main(["run", "deepseek-llm-tiny", "--prompt", "hi", "--keep-fp8"]) == 2
    assert "keep_fp8 applies to FP8 checkpoint" in capsys.readouterr().err


def test_compile_report_summary_and_full(capsys):
    assert main(["compile", "deepseek-v3-tiny", "--backend", "eager"]) == 0
    summary = capsys.readouterr().out
    assert "linear ×" in summary and "fallbacks: 0" in summary
    assert main(["compile", "deepseek-v3-tiny", "--backend", "eager", "--report", "full"]) == 0
    full = capsys.readouterr().out
    assert len(full.splitlines()) > len(summary.splitlines()) and "linear ×" not in full
