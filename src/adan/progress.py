"""A progress line for long runs, without dependencies: rate, ETA and the latest losses.

On a terminal the line is redrawn in place (``\\r``) a few times a second; elsewhere (a log
file, a pipe, a test) it is printed as a plain line every ``log_every`` seconds, so logs stay
readable. The main job's install is torch alone, which is why this is not tqdm.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75`` -> ``'1m15s'``, ``3700`` -> ``'1h01m'``, ``9`` -> ``'9s'``: short and unambiguous."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Iteration ``k`` of ``total`` for one labelled run: a bar, it/s, ETA, latest losses.

    ``update(done)`` after each step, ``losses(train, val)`` after an evaluation, ``clear()``
    before printing anything else to the terminal, ``close()`` at the end (the final line).
    ``stream`` defaults to stderr, so the report on stdout stays clean; ``clock`` is
    replaceable for tests.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None,
                 log_every: float = 30.0, redraw_every: float = 0.2,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = redraw_every if self.tty else log_every
        self.clock = clock
        self.start = clock()
        # A log's first line waits one interval: the first steps' rate (and ETA) is noise.
        self.last_shown = -float("inf") if self.tty else self.start
        self.shown_done = -1
        self.done = 0
        # The rate counts from the first update: setup and a first evaluation are no guide.
        self.since: tuple[float, int] | None = None
        self.train: float | None = None
        self.val: float | None = None

    def line(self) -> str:
        """The current state as one line."""
        now = self.clock()
        elapsed = now - self.start
        began, first = self.since if self.since is not None else (now, self.done)
        rate = (self.done - first) / (now - began) if now > began else 0.0
        width = len(str(self.total))
        fraction = min(1.0, self.done / max(1, self.total))
        # A bar on a terminal; a percentage in logs, where a bar per line is noise.
        shown = (f"|{'#' * round(10 * fraction):<10}|" if self.tty
                 else f"({100 * fraction:3.0f}%)")
        parts = [f"{self.label} {shown} {self.done:>{width}}/{self.total}",
                 f"{rate:.1f} it/s" if rate else "- it/s"]
        if self.done >= self.total:
            parts.append(f"took {format_duration(elapsed)}")
        else:
            eta = (self.total - self.done) / rate if rate else None
            parts.append(f"ETA {format_duration(eta)}" if eta is not None else "ETA -")
        if self.train is not None and self.val is not None:
            parts.append(f"train {self.train:.4f} val {self.val:.4f}")
        return "  ".join(parts)

    def _show(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self.last_shown < self.every:
            return
        self.last_shown, self.shown_done = now, self.done
        if self.tty:
            # Cut to the terminal's width: a wrapped line cannot be redrawn in place.
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r" + self.line()[:width] + "\x1b[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def update(self, done: int) -> None:
        """``done`` iterations are finished."""
        self.done = done
        if self.since is None:
            self.since = (self.clock(), done)
        self._show(force=self.tty and done == 1)

    def losses(self, train: float, val: float) -> None:
        """The latest evaluation's train and val losses (shown from the next line on)."""
        self.train, self.val = train, val

    def clear(self) -> None:
        """Wipe the line on a terminal so other output can be printed; redrawn on next update."""
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.last_shown = -float("inf")

    def close(self) -> None:
        """Print the final state (unless that line is out already) and end the line."""
        if self.tty or self.shown_done != self.done:
            self._show(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
