"""The dependency-free progress line: in-place on a terminal, plain lines in a log."""

from __future__ import annotations

import io

from adan.progress import Progress, format_duration


class FakeClock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 9.4, 75, 3700)] == ["0s", "9s", "1m15s", "1h01m"]


def test_log_lines_every_interval_with_rate_and_eta() -> None:
    clock, log = FakeClock(), io.StringIO()
    bar = Progress(100, "run 2/3 AdamW", stream=log, log_every=10.0, clock=clock)
    for done in range(1, 51):
        clock.now = done * 0.5  # 2 it/s
        bar.update(done)
    bar.losses(2.5, 2.75)
    clock.now = 50.0
    bar.update(100)
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[0] == "run 2/3 AdamW ( 20%)  20/100  2.0 it/s  ETA 40s"
    counts = [line.split(")")[1].split()[0] for line in lines]
    assert counts == ["20/100", "40/100", "100/100"]
    assert lines[-1].endswith("took 50s  train 2.5000 val 2.7500")


def test_terminal_redraws_in_place_and_clears_for_other_output() -> None:
    clock, term = FakeClock(), Terminal()
    bar = Progress(10, "run 1/3 Adan", stream=term, clock=clock)
    clock.now = 1.0
    bar.update(1)
    bar.clear()
    clock.now = 1.05  # inside the redraw interval, but the line was cleared: drawn again
    bar.update(2)
    bar.close()
    text = term.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and text.count("\n") == 1
    assert "|#         |" in text and "|##        |" in text and "\r\x1b[K" in text
