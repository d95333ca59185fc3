"""The command line: help, show, run, check, compile and the demo."""
import shutil
import subprocess
import sys

from dsgraph.app import cli_guard as guard
from dsgraph.app.cli import main


def test_console_script_help():
    exe = shutil.which("dsgraph")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "dsgraph.app.cli", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for sub in ("show", "compile", "run", "check", "bench", "demo"):
        assert sub in out


def test_show_full_size_v3(capsys):
    assert main(["show", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671.07 B" in out and "576 per layer" in out and "40,960 per layer" in out


def test_show_graph_text(capsys):
    assert main(["show", "deepseek-v2-lite-tiny", "--graph"]) == 0
    out = capsys.readouterr().out
    assert "attention.mla(" in out and "moe.route(" in out


def test_run_streams_tokens_and_rates(capsys):
    assert main(["run", "deepseek-llm-tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    toks = out.split("tokens:")[1].splitlines()[0].split()
    assert len(toks) == 4 and all(t.isdigit() for t in toks)
    assert "time to first token" in out and "tokens/s" in out


def test_prompt_ids_take_commas_or_spaces():
    assert guard.token_ids("1,2,3") == guard.token_ids("1 2  3") == guard.token_ids(" 1, 2 3 ") == [1, 2, 3]


def test_check_eager(capsys):
    assert main(["check", "deepseek-moe-tiny", "--backend", "eager"]) == 0
    assert "OK" in capsys.readouterr().out


def test_bad_input_is_an_error_not_a_traceback(capsys):
    assert main(["run", "deepseek-llm-tiny", "--prompt-ids", "1,999"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    assert main(["show", "no-such-model"]) == 2
    assert "Presets:" in capsys.readouterr().err


def test_demo(capsys):
    assert main(["demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "eager" in out and "agrees" in out


def test_compile_report(capsys):
    assert main(["compile", "deepseek-v3-tiny", "--backend", "eager"]) == 0
    out = capsys.readouterr().out
    assert "fallbacks: 0" in out and "prune_mtp" in out
