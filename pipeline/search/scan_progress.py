"""The progress line of the long passes over an output (index, exact search, near-duplicates).

`index: units 120/400 | rows 310,000 | 52,000 rows/s | ETA 0:14`: one line rewritten in
place on a terminal; piped to a log, a line every `interval_s` seconds and one at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Passes over fewer units than this finish before a progress line would help.
QUIET_UNDER_UNITS = 2


class ScanProgress:
    def __init__(
        self,
        what: str,
        units: int,
        write: Callable[[str], None],
        live: bool,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what = what
        self.units = units
        self.write = write
        self.live = live
        self.interval_s = interval_s
        self.clock = clock
        self.started = clock()
        self.last_shown = self.started
        self.done = 0
        self.rows = 0
        self._width = 0

    def unit_done(self, rows: int) -> None:
        """One more unit file read (`rows` rows)."""
        self.done += 1
        self.rows += rows
        now = self.clock()
        due = self.live or now - self.last_shown >= self.interval_s
        if self.units >= QUIET_UNDER_UNITS and due:
            self.last_shown = now
            self._show(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.rows / elapsed
        text = (
            f"{self.what}: units {self.done}/{self.units} | rows {self.rows:,} | {rate:,.0f} rows/s"
        )
        if 0 < self.done < self.units:
            left_s = elapsed / self.done * (self.units - self.done)
            text += f" | ETA {int(left_s // 60)}:{int(left_s % 60):02d}"
        return text

    def finish(self) -> None:
        """Clears the live line (the command's result follows), or logs the last line."""
        if self.live and self._width:
            self.write("\r" + " " * self._width + "\r")
            self._width = 0
        elif not self.live and self.units >= QUIET_UNDER_UNITS:
            self.write(self.line(self.clock()) + "\n")

    def _show(self, text: str) -> None:
        if self.live:
            self.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.write(text + "\n")


class ProgressLines:
    """What the search library takes as `progress`: progress(what, units) starts a pass's line
    and returns its per-unit callback; finish() ends every line started."""

    def __init__(self, write: Callable[[str], None], live: bool):
        self.write = write
        self.live = live
        self.lines: list[ScanProgress] = []

    def __call__(self, what: str, units: int) -> Callable[[int], None]:
        self.finish()
        self.lines.append(ScanProgress(what, units, self.write, self.live))
        return self.lines[-1].unit_done

    def finish(self) -> None:
        for line in self.lines:
            line.finish()
        self.lines.clear()
