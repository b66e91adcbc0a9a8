"""kt_core.progress: never silent without a terminal, a bar with one, off with KT_PROGRESS=0."""
import io
import sys

import pytest

from kt_core.progress import progress


class Tty(io.StringIO):
    def isatty(self):
        return True


def run_steps(n, stream, monkeypatch):
    monkeypatch.setattr(sys, "stderr", stream)
    with progress("loading model (3 layers)", n) as advance:
        for _ in range(n):
            advance()
    return stream.getvalue()


def test_without_a_terminal_one_line_at_start_and_one_at_the_end(monkeypatch):
    monkeypatch.delenv("KT_PROGRESS", raising=False)
    lines = run_steps(3, io.StringIO(), monkeypatch).splitlines()
    assert lines[0] == "loading model (3 layers) ..."
    assert lines[1].startswith("loading model (3 layers): 3/3 done in ") and lines[1].endswith(" s")
    assert len(lines) == 2


def test_on_a_terminal_a_bar_then_the_summary(monkeypatch):
    monkeypatch.delenv("KT_PROGRESS", raising=False)
    out = run_steps(3, Tty(), monkeypatch)
    assert "\x1b[" in out  # rich drew (and, transient, cleared) its bar
    assert "loading model (3 layers): 3/3 done in " in out.rstrip().splitlines()[-1]
    assert "loading model (3 layers) ...\n" not in out  # the bar replaces the start line


def test_kt_progress_0_silences_it(monkeypatch):
    monkeypatch.setenv("KT_PROGRESS", "0")
    assert run_steps(3, io.StringIO(), monkeypatch) == ""


def test_failed_work_is_not_reported_done(monkeypatch):
    monkeypatch.delenv("KT_PROGRESS", raising=False)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with pytest.raises(RuntimeError):
        with progress("loading", 2) as advance:
            advance()
            raise RuntimeError("boom")
    assert "done in" not in stream.getvalue()
