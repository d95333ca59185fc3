"""When a progress bar shows (dsgraph/progress.py): only on a terminal for long work, never under -q or
DSGRAPH_PROGRESS=0, always with DSGRAPH_PROGRESS=1; on stderr."""
import io
import logging
import sys

import pytest

from dsgraph import progress


class _Terminal(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("tty, long, env, level, show, shown", [
    (True, True, None, logging.NOTSET, True, True),     # a user's terminal, long work: a bar
    (True, False, None, logging.INFO, True, False),     # short work: none
    (False, True, None, logging.NOTSET, True, False),   # a pipe or log file: none
    (False, False, "1", logging.INFO, True, True),      # forced on
    (True, True, "0", logging.NOTSET, True, False),     # forced off
    (True, True, "1", logging.ERROR, True, False),      # -q wins over forcing
    (True, True, "1", logging.NOTSET, False, False),    # the caller turned progress off
])
def test_when_a_bar_shows(monkeypatch, tty, long, env, level, show, shown):
    err = _Terminal(tty)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(logging.getLogger("dsgraph"), "level", level)
    if env is None:
        monkeypatch.delenv(progress.ENV, raising=False)
    else:
        monkeypatch.setenv(progress.ENV, env)
    items = list(progress.track(range(5), "counting", long=long, show=show, name=lambda i: f"item {i}"))
    assert items == list(range(5))
    out = err.getvalue()
    assert ("counting:" in out and "/5" in out) == shown
    assert out.endswith("\r") if shown else out == ""     # a finished bar clears its line (leave=False)
