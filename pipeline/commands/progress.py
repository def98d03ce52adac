"""The progress line of `run` and `relabel`: from the first second, the phase the command is in,
then files and windows as they are classified, errors, and an ETA.

On a terminal it is one line rewritten in place (a ticker keeps it moving while Ray starts, and
clears it at the end, where the summary takes over); piped to a file or a log, it is a new line
every `interval_s` seconds (and at the end), never a wall of repeated bars. Messages (`note`) are
printed above it. Its rate is files per second of the whole command, as the summary's is; the
ETA comes from the input bytes read so far against all of them: the audio done, steadily.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pipeline.labeling.summary import plural
from pipeline.output.commit import CommittedUnit, StagedCounts

# How often a terminal's line is redrawn while nothing happens (Ray starting, a long batch).
TICK_S = 0.5


class Progress:
    def __init__(
        self,
        write: Callable[[str], None],
        live: bool,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        ticker: bool = True,
    ):
        self.write = write
        self.live = live
        self.interval_s = interval_s
        self.clock = clock
        self.started = clock()
        # A log's first line comes after an interval: a command that ends sooner prints none.
        self.last_shown = -float("inf") if live else self.started
        self.last_text = ""
        self.phase_text = "starting"
        self.units = 0  # units to label (0 until labeling starts)
        self.unit_noun = ("unit", "units")
        self.files_total: int | None = None  # known for plain files; tar shards' members are not
        self.bytes_total = 0
        self.labeling_since: float | None = None
        self.staged = StagedCounts()
        self.committed = 0
        self.failed = 0
        self._width = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True) if ticker else None
        if self._ticker:
            self._ticker.start()

    # --- what the command says ---------------------------------------------------------------

    def phase(self, text: str) -> None:
        """What the command is doing now ("planning the inputs", "starting Ray", ...): at once on
        a terminal; in a log only when it lasts (the ticker's line every interval)."""
        with self._lock:
            self.phase_text = text
            if self.live:
                self._show()

    def note(self, line: str) -> None:
        """A message, printed above the progress line."""
        with self._lock:
            if self.live and self._width:
                self.write("\r" + " " * self._width + "\r")
                self._width = 0
            self.write(line + "\n")
            if self.live and not self._stop.is_set():  # after finish(), no line to bring back
                self._show()

    def start_labeling(
        self, units: int, tar_shards: bool, files: int | None, input_bytes: int
    ) -> None:
        """What there is to label; the phase stays until the first rows are classified."""
        with self._lock:
            self.units = units
            self.unit_noun = ("tar shard", "tar shards") if tar_shards else ("unit", "units")
            self.files_total = files
            self.bytes_total = input_bytes

    # --- what the run reports (output.commit.CommitListener) ---------------------------------

    def rows_staged(self, counts: StagedCounts) -> None:
        with self._lock:
            if self.labeling_since is None:
                self.phase_text = "labeling"
                self.labeling_since = self.clock()
            self.staged += counts
            self._maybe_show()

    def unit_committed(self, unit: CommittedUnit) -> None:
        with self._lock:
            self.committed += 1
            self._maybe_show()

    def unit_failed(self, unit_id: str, reason: str) -> None:
        with self._lock:
            self.failed += 1
            self._maybe_show()

    def waiting(self) -> None:
        with self._lock:
            self._maybe_show()

    def finish(self) -> None:
        """Stops the ticker; a terminal's line is cleared (the summary follows), a log gets the
        last line. Once: the run and the command around it may both call it."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._ticker:
            self._ticker.join()
        with self._lock:
            if self.live:
                if self._width:
                    self.write("\r" + " " * self._width + "\r")
                self._width = 0
            elif self.labeling_since is not None and self.line() != self.last_text:
                self._show()

    # --- the line ----------------------------------------------------------------------------

    def line(self) -> str:
        now = self.clock()
        elapsed = now - self.started
        if self.labeling_since is None:
            return f"{self.phase_text} ... {format_duration(elapsed)}"
        staged = self.staged
        files = f"files {staged.files}" + (f"/{self.files_total}" if self.files_total else "")
        singular, many = self.unit_noun
        parts = [
            files,
            plural(staged.windows, "window"),
            plural(staged.errors, "error"),
            f"{self.committed}/{self.units} {many if self.units != 1 else singular} committed",
        ]
        if self.failed:
            parts.append(f"not committed {self.failed}")
        if elapsed >= 1.0:  # a rate over less than a second says nothing
            parts.append(f"{staged.files / elapsed:.1f} files/s")
        eta = self._eta(now)
        parts.append(f"ETA {format_duration(eta)}" if eta is not None else format_duration(elapsed))
        return " | ".join(parts)

    def _eta(self, now: float) -> float | None:
        """Seconds left: the time labeling has taken so far, scaled by the input bytes left."""
        if self.labeling_since is None or not self.bytes_total or not self.staged.source_bytes:
            return None
        if self.committed + self.failed >= self.units:
            return None
        done = min(1.0, self.staged.source_bytes / self.bytes_total)
        labeling_s = now - self.labeling_since
        if labeling_s < 2.0 or done >= 1.0:
            return None
        return labeling_s * (1.0 - done) / done

    def _maybe_show(self) -> None:
        # In place on a terminal: often is cheap. In a log: every interval only.
        if self.clock() - self.last_shown >= (TICK_S if self.live else self.interval_s):
            self._show()

    def _show(self) -> None:
        self.last_shown = self.clock()
        text = self.last_text = self.line()
        if self.live:
            padding = max(0, self._width - len(text))
            self._width = len(text)
            self.write("\r" + text + " " * padding)
        else:
            self.write(text + "\n")

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                if not self._stop.is_set():
                    self._maybe_show()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
