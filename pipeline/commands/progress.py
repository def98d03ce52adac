"""`ast-label run`'s own progress line: units and files done, files/s, audio-hours/s, errors, ETA.

On a terminal it is one line rewritten in place; piped to a file or a log, it is a new line every
`interval_s` seconds (and at the end), never a wall of repeated bars.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.output.commit import CommittedUnit


class Progress:
    def __init__(
        self,
        total_units: int,
        write: Callable[[str], None],
        live: bool,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total_units = total_units
        self.write = write
        self.live = live
        self.interval_s = interval_s
        self.clock = clock
        self.started = clock()
        self.last_shown = -float("inf")
        self.units = 0
        self.failed = 0
        self.files = 0
        self.errors = 0
        self.audio_s = 0.0
        self._width = 0

    def unit_committed(self, unit: CommittedUnit) -> None:
        self.units += 1
        self.files += unit.files
        self.errors += unit.errors
        self.audio_s += unit.audio_seconds
        self._maybe_show()

    def unit_failed(self, unit_id: str, reason: str) -> None:
        self.failed += 1
        self._maybe_show()

    def waiting(self) -> None:
        """Called while waiting: keeps the rate and ETA fresh between commits."""
        self._maybe_show()

    def finish(self) -> None:
        self._show()
        if self.live:
            self.write("\n")

    def line(self) -> str:
        elapsed = self.clock() - self.started
        done = self.units + self.failed
        parts = [f"units {done}/{self.total_units}", f"files {self.files}"]
        if elapsed >= 1.0:  # a rate over less than a second says nothing
            parts.append(f"{self.files / elapsed:.1f} files/s")
            parts.append(f"{self.audio_s / 3600 / elapsed:.3f} audio-h/s")
        parts.append(f"errors {self.errors}")
        if self.failed:
            parts.append(f"not committed {self.failed}")
        if 0 < done < self.total_units and elapsed >= 1.0:
            remaining = elapsed / done * (self.total_units - done)
            parts.append(f"ETA {format_duration(remaining)}")
        elif done == self.total_units:
            parts.append(f"in {format_duration(elapsed)}")
        return " | ".join(parts)

    def _maybe_show(self) -> None:
        now = self.clock()
        # In place on a terminal: often is cheap. In a log: every interval only.
        if now - self.last_shown >= (0.5 if self.live else self.interval_s):
            self._show()

    def _show(self) -> None:
        self.last_shown = self.clock()
        text = self.line()
        if self.live:
            padding = max(0, self._width - len(text))
            self._width = len(text)
            self.write("\r" + text + " " * padding)
        else:
            self.write(text + "\n")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
