"""A progress line for a long pass over rows: the count, rows/s and an ETA, redrawn in place on a terminal.

The ETA comes from the total when the count is known in advance (tokenizing), else from the share of the
input's bytes read so far (reading a file whose row count is found only at its end). Off a terminal (a log
file, CI) nothing is drawn, and the caller logs the one summary line ``finish`` returns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

REDRAW_SECONDS = 0.5


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class RateProgress:
    """``verb`` ``done`` rows so far: redrawn on ``stream`` (stderr) at most every ``REDRAW_SECONDS`` while it is a
    terminal; ``total`` (rows) or ``size`` (bytes) gives the ETA."""

    def __init__(self, verb: str, *, total: int | None = None, size: int | None = None, unit: str = "rows",
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.verb, self.total, self.size, self.unit = verb, total, size, unit
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self.clock = clock
        self.started = self.drawn_at = clock()
        self.done, self.position = 0, 0
        self._width = 0

    def update(self, done: int, position: int | None = None) -> None:
        """``done`` rows so far (and ``position`` bytes of ``size`` read, when reading)."""
        self.done = done
        if position is not None:
            self.position = position
        now = self.clock()
        if self.live and now - self.drawn_at >= REDRAW_SECONDS:
            self.drawn_at = now
            self._draw(self.line(now))

    def advance(self, rows: int) -> None:
        self.update(self.done + rows)

    def share(self) -> float | None:
        """The part of the pass done (0 to 1), or None when neither the total nor the size is known."""
        if self.total:
            return min(self.done / self.total, 1.0)
        if self.size:
            return min(self.position / self.size, 1.0)
        return None

    def line(self, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        share = self.share()
        parts = [f"{self.verb} {self.done:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"]
        if share is not None:
            parts[0] += f" {100 * share:.0f}%"
        parts.append(f"{rate:,.0f} {self.unit}/s")
        eta = elapsed * (1 - share) / share if share else None
        parts.append(f"elapsed {format_seconds(elapsed)}" + (f" eta {format_seconds(eta)}" if eta is not None else ""))
        return " | ".join(parts)

    def _draw(self, text: str) -> None:
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def clear(self) -> None:
        """Take the line off the terminal (before a summary or an error message is printed)."""
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def __enter__(self) -> RateProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.clear()

    def finish(self) -> str:
        """Clear the line (on a terminal) and return the summary: how many rows, how long, how fast."""
        self.clear()
        elapsed = self.clock() - self.started
        rate = f", {self.done / elapsed:,.0f} {self.unit}/s" if elapsed > 0 else ""
        return f"{self.verb} {self.done:,} {self.unit} in {elapsed:.1f} s{rate}"
