"""Progress bars show on a terminal only (never in an executed notebook's output), and never when asked not to."""

from __future__ import annotations

import io

from ubwlib._progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_shows_on_a_terminal_only(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    term = _Terminal()
    assert list(progress_bar(range(3), file=term, desc="epochs")) == [0, 1, 2]
    assert "epochs" in term.getvalue()
    captured = io.StringIO()  # a notebook's stream, a pipe, a log file: not a terminal
    assert list(progress_bar(range(3), file=captured)) == [0, 1, 2]
    assert captured.getvalue() == ""


def test_progress_false_hides_the_bar_even_on_a_terminal(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    term = _Terminal()
    bar = progress_bar(range(2), progress=False, file=term)
    assert list(bar) == [0, 1] and bar.disable and term.getvalue() == ""
