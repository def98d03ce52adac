"""The driver at 100,000 tar shards: planning, time to the first read, memory, and a rerun that has
nothing to do.

    .venv/bin/python benchmarks/bench_scale.py                 # 100,000 shards
    .venv/bin/python benchmarks/bench_scale.py --shards 20000
    .venv/bin/python benchmarks/bench_scale.py --before /tmp/before  # and an earlier checkout's

The shards are empty files (the point is the driver, not the audio). Reported:
- plan: `plan_work_units` on a brace range naming every shard, and on a glob, in this process;
- first read: `ast-label run` on them in a fresh process, from its start to the moment the first
  read task runs (a process titled ray::ReadWorkUnitSource appears), then the run is stopped;
  the driver's peak RSS until then;
- rerun: an output that already holds every unit (the markers of one real run, cloned per shard,
  with their final files), then `ast-label run` again: its wall time to decide there is nothing to
  do, with the markers' index and without it (a run killed before writing it), and the driver's
  peak RSS.
Targets on the 2-core machine: each time <= 60 s, driver memory <= 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.defaults import META_DIR  # noqa: E402
from pipeline.labeling.plan import plan_work_units  # noqa: E402
from pipeline.output.commit import CommittedUnit  # noqa: E402
from pipeline.output.index import write_index  # noqa: E402
from pipeline.output.layout import COMMITS_DIR, INDEX_NAME, OutputLocation  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
ast_label = str(Path(sys.executable).with_name("ast-label"))


def make_shards(folder: Path, count: int) -> str:
    folder.mkdir(parents=True)
    for index in range(count):
        (folder / f"shard-{index:06d}.tar").touch()
    return f"{folder}/shard-{{000000..{count - 1:06d}}}.tar"


class Watch:
    """Samples a process session: peak RSS of its leader, and when a process title first shows."""

    def __init__(self, process: subprocess.Popen, title: str | None = None):
        self.process = process
        self.title = title
        self.seen_at: float | None = None
        self.peak_rss = 0
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        status = Path(f"/proc/{self.process.pid}/status")
        while self.process.poll() is None and self.seen_at is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
            except OSError:
                pass
            if self.title and self._title_seen():
                self.seen_at = time.perf_counter() - self.started
            time.sleep(0.05)

    def _title_seen(self) -> bool:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if cmdline.read_bytes().startswith(self.title.encode()) and (
                    os.getsid(int(cmdline.parent.name)) == self.process.pid
                ):
                    return True
            except OSError:
                continue
        return False


def time_to_first_read(
    pattern: str, output: Path, model: Path, code: Path | None = None
) -> tuple[float, int]:
    """Seconds from the start of `ast-label run` (this checkout's, or the one at `code`) to its
    first read task, and the driver's peak RSS until then."""
    from bench_pipeline import ast_label_command

    command = [*ast_label_command(code), "run", pattern, "--output", str(output)]
    process = subprocess.Popen(
        [*command, "--model", str(model)],
        env={**ENV, **({"PYTHONPATH": str(code)} if code else {})},
        cwd=code,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    watch = Watch(process, title="ray::ReadWorkUnitSource")
    deadline = time.perf_counter() + 600
    while watch.seen_at is None and process.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.1)
    seen, peak = watch.seen_at, watch.peak_rss
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    if seen is None:
        raise SystemExit(f"no read task started:\n{process.stderr.read().decode()[-2000:]}")
    return seen, peak


def finished_output(pattern: str, shards: Path, count: int, output: Path, model: Path) -> None:
    """One real run on one shard for a genuine marker, then that marker cloned for every shard."""
    first = shards / "shard-000000.tar"
    subprocess.run(
        [ast_label, "run", str(first), "--output", str(output), "--model", str(model)],
        env=ENV,
        check=True,
        capture_output=True,
    )
    commits = output / COMMITS_DIR
    (template_path,) = commits.glob("*.json")
    template = json.loads(template_path.read_text())
    markers = []
    for unit in plan_work_units([pattern]).units:
        marker = {**template, "unit_id": unit.unit_id, "sources": list(unit.sources)}
        marker["file"] = f"{unit.unit_id}.parquet"
        (commits / f"{unit.unit_id}.json").write_text(json.dumps(marker))
        # A rerun lists the final files' names and reads none: empty stand-ins will do.
        (output / marker["file"]).touch()
        markers.append(marker)
    time.sleep(1.1)  # the index must be newer than every marker
    location = OutputLocation.of(str(output))
    write_index(location, (CommittedUnit.from_marker(marker) for marker in markers))
    assert len(markers) == count


def time_rerun(pattern: str, output: Path, model: Path) -> tuple[float, int, str]:
    command = [ast_label, "run", pattern, "--output", str(output), "--model", str(model)]
    process = subprocess.Popen(
        command, env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    watch = Watch(process)
    _, stderr = process.communicate()
    elapsed = time.perf_counter() - watch.started
    watch.thread.join()
    if process.returncode != 0:
        raise SystemExit(f"rerun failed:\n{stderr.decode()[-2000:]}")
    first_line = stderr.decode().splitlines()[0]
    return elapsed, watch.peak_rss, first_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument(
        "--before",
        type=Path,
        help="A checkout of an earlier ast-label (git worktree add /tmp/before REV): its start to "
        "the first read and driver memory are measured too, in this invocation.",
    )
    args = parser.parse_args()
    from bench_pipeline import write_checkpoint

    with tempfile.TemporaryDirectory(prefix="ast-label-scale-") as scratch:
        root = Path(scratch)
        model = write_checkpoint("tiny", root / "model")
        pattern = make_shards(root / "shards", args.shards)

        started = time.perf_counter()
        units = plan_work_units([pattern]).units
        plan_brace = time.perf_counter() - started
        started = time.perf_counter()
        plan_work_units([f"{root}/shards/*.tar"])
        plan_glob = time.perf_counter() - started
        assert len(units) == args.shards

        first_read, first_rss = time_to_first_read(pattern, root / "out-first", model)
        if args.before:
            before = time_to_first_read(pattern, root / "out-before", model, args.before)
        finished_output(pattern, root / "shards", args.shards, root / "done", model)
        rerun, rerun_rss, said = time_rerun(pattern, root / "done", model)
        (root / "done" / INDEX_NAME).unlink()
        rerun_cold, cold_rss, said_cold = time_rerun(pattern, root / "done", model)
        rerun_again, _, _ = time_rerun(pattern, root / "done", model)

        gib = 2**30
        print(f"{args.shards} tar shards (empty files), local disk; targets: <= 60 s, <= 1 GiB")
        print(f"plan: brace range {plan_brace:.1f} s, glob {plan_glob:.1f} s")
        print(
            f"start -> first read task running: {first_read:.1f} s; driver peak RSS "
            f"{first_rss / gib:.2f} GiB"
        )
        print(
            f"rerun of a finished output: {rerun:.1f} s with the markers' index (driver peak "
            f"RSS {rerun_rss / gib:.2f} GiB), {rerun_cold:.1f} s without it (every marker read, "
            f"then the index rewritten; {cold_rss / gib:.2f} GiB), {rerun_again:.1f} s the "
            "time after"
        )
        if args.before:
            print(
                f"before ({args.before}): start -> first read task running: {before[0]:.1f} s; "
                f"driver peak RSS {before[1] / gib:.2f} GiB"
            )
        print(f"  it said: {said}")
        assert "0 to label" in said and "0 to label" in said_cold, (said, said_cold)
        assert (root / "done" / META_DIR).is_dir()


if __name__ == "__main__":
    main()
