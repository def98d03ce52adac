"""The terminal: ast-label's own progress line (in place on a terminal, one line per interval in a
log), and Ray quiet unless --verbose."""

from __future__ import annotations

from pipeline.commands.progress import Progress, format_duration
from pipeline.output.commit import CommittedUnit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def unit(files: int, errors: int = 0, seconds: float = 10.0) -> CommittedUnit:
    return CommittedUnit("u", (), "", files, files, errors, seconds * files, {})


def test_on_a_terminal_one_line_is_rewritten_in_place():
    clock, written = Clock(), []
    progress = Progress(4, written.append, live=True, clock=clock)
    for second in (1, 2, 3):
        clock.now = second
        progress.unit_committed(unit(50, errors=1))
    clock.now = 3.2  # too soon after the last redraw: nothing new
    progress.waiting()
    clock.now = 4
    progress.unit_failed("u", "boom")
    progress.finish()

    text = "".join(written)
    assert text.count("\n") == 1 and text.endswith("\n")
    frames = text.rstrip("\n").split("\r")[1:]
    assert frames[0].startswith("units 1/4 | files 50 | 50.0 files/s | 0.139 audio-h/s | errors 1")
    assert "ETA 3s" in frames[0]
    final = frames[-1].rstrip()
    assert final == (
        "units 4/4 | files 150 | 37.5 files/s | 0.104 audio-h/s | errors 3 | not committed 1 "
        "| in 4s"
    )


def test_in_a_log_a_line_every_interval_and_one_at_the_end():
    clock, written = Clock(), []
    progress = Progress(100, written.append, live=False, interval_s=10, clock=clock)
    for index in range(100):
        clock.now = index * 0.5  # 50 s in all: one line at the start, then one per 10 s
        progress.unit_committed(unit(10))
    progress.finish()

    assert all(line.endswith("\n") and "\r" not in line for line in written)
    assert len(written) == 6  # t = 0, 10, 20, 30, 40 and the end
    assert written[0] == "units 1/100 | files 10 | errors 0\n"  # no rate or ETA over 0 s
    assert written[-1].startswith("units 100/100 | files 1000 | 20.2 files/s")


def test_durations_read_as_a_person_writes_them():
    assert [format_duration(s) for s in (5, 75, 3600 * 2 + 61)] == ["5s", "1m15s", "2h01m"]


def test_ray_data_is_quiet_unless_verbose():
    import logging

    from ray.data import DataContext

    from pipeline.cluster import configure_ray_data

    context = DataContext.get_current()
    before = (context.enable_progress_bars, context.enable_operator_progress_bars)
    level = logging.getLogger("ray.data").level
    try:
        configure_ray_data(verbose=False)
        assert not context.enable_progress_bars and not context.enable_operator_progress_bars
        assert logging.getLogger("ray.data").level == logging.ERROR
        configure_ray_data(verbose=True)  # --verbose: Ray's bars and INFO logs come back
        assert context.enable_progress_bars and context.enable_operator_progress_bars
        assert logging.getLogger("ray.data").level == logging.INFO
    finally:
        context.enable_progress_bars, context.enable_operator_progress_bars = before
        logging.getLogger("ray.data").setLevel(level)
