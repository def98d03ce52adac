"""The terminal: ast-label's own progress line (in place on a terminal, one line per interval in a
log), and Ray quiet unless --verbose."""

from __future__ import annotations

from pipeline.commands.progress import Progress, format_duration
from pipeline.output.commit import CommittedUnit, StagedCounts


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def unit(files: int, errors: int = 0, seconds: float = 10.0) -> CommittedUnit:
    return CommittedUnit("u", (), "", files, files, errors, seconds * files, {})


def staged(files: int, errors: int = 0, bytes_each: int = 1000) -> StagedCounts:
    return StagedCounts(files, files - errors, errors, 10.0 * files, files * bytes_each)


def frames(written: list[str]) -> list[str]:
    """What a terminal shows, one entry per redraw of the line."""
    return [frame.rstrip() for frame in "".join(written).split("\r") if frame.strip()]


def test_on_a_terminal_the_phase_shows_at_once_and_the_line_is_cleared_at_the_end():
    clock, written = Clock(), []
    progress = Progress(written.append, live=True, clock=clock, ticker=False)
    progress.phase("planning the inputs")
    clock.now = 3
    progress.phase("starting Ray")
    progress.note("Ray: 2 CPUs, 0 GPUs; 1 classifier actor on CPU, batches of 32")
    progress.start_labeling(4, tar_shards=True, files=None, input_bytes=200_000)
    clock.now = 5
    progress.rows_staged(staged(50, errors=1))
    clock.now = 9
    progress.rows_staged(staged(50))
    progress.unit_committed(unit(50))
    progress.finish()

    shown = frames(written)
    assert shown[0] == "planning the inputs ... 0s"
    assert shown[1] == "starting Ray ... 3s"
    assert "Ray: 2 CPUs, 0 GPUs; 1 classifier actor on CPU, batches of 32\n" in written
    assert shown[-1].startswith("files 100 | 99 windows | 1 error | 0/4 tar shards committed")
    assert "11.1 files/s" in shown[-1] and "ETA 4s" in shown[-1]  # half the bytes in 4 s
    assert "".join(written).endswith("\r")  # cleared: the summary takes over
    assert "\n" not in "".join(written).replace("batches of 32\n", "")


def test_in_a_log_a_line_every_interval_and_none_for_a_quick_command():
    clock, written = Clock(), []
    progress = Progress(written.append, live=False, interval_s=10, clock=clock, ticker=False)
    progress.phase("planning the inputs")
    progress.phase("starting Ray")
    progress.finish()
    assert written == []  # a command that ends within the interval prints no progress

    progress = Progress(written.append, live=False, interval_s=10, clock=clock, ticker=False)
    progress.start_labeling(100, tar_shards=False, files=1000, input_bytes=1_000_000)
    for index in range(100):
        clock.now = index * 0.5  # 50 s in all: one line per 10 s
        progress.rows_staged(staged(10))
        progress.unit_committed(unit(10))
    progress.finish()

    assert all(line.endswith("\n") and "\r" not in line for line in written)
    assert len(written) == 5  # t = 10, 20, 30, 40 and the end
    assert written[0].startswith("files 210/1000 | 210 windows | 0 errors | 20/100 units")
    assert written[-1].startswith("files 1000/1000 | 1000 windows")
    assert written[-1].rstrip().endswith("| 50s")  # done: the time taken, no ETA


def test_the_eta_follows_the_input_bytes_read():
    clock, written = Clock(), []
    progress = Progress(written.append, live=False, clock=clock, ticker=False)
    progress.start_labeling(10, tar_shards=False, files=None, input_bytes=10_000)
    clock.now = 20  # the first rows after 20 s of start-up, which does not count
    progress.rows_staged(staged(1, bytes_each=1_000))
    clock.now = 30
    progress.rows_staged(staged(1, bytes_each=1_000))
    assert progress.line().endswith("ETA 40s")  # 2 of 10 kB in 10 s of labeling


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
