"""The driver at 100,000 tar shards: planning, time to the first read, memory, a rerun that has
nothing to do, and a folder of 100,000 labeled files that grew by 1,000.

    .venv/bin/python benchmarks/bench_scale.py                 # 100,000 shards
    .venv/bin/python benchmarks/bench_scale.py --shards 20000
    .venv/bin/python benchmarks/bench_scale.py --before /tmp/before  # and an earlier checkout's
    .venv/bin/python benchmarks/bench_scale.py --only growth --files 100000 --new-files 1000

The shards are empty files (the point is the driver, not the audio). Reported:
- plan: `plan_work_units` on a brace range naming every shard, and on a glob, in this process;
- first read: `ast-label run` on them in a fresh process, from its start to the moment the first
  read task runs (a process titled ray::ReadWorkUnitSource appears), then the run is stopped;
  the driver's peak RSS until then;
- rerun: an output that already holds every unit (the markers of one real run, cloned per shard,
  with their final files), then `ast-label run` again: its wall time to decide there is nothing to
  do, with the markers' index and without it (a run killed before writing it), and the driver's
  peak RSS;
- growth: a folder of --files plain files (empty .wav files) whose output holds them all (markers
  cloned as above, in units of 256 files, as a run groups them), then --new-files more files and
  `ast-label run` on the folder again: the time from its start until its plan line ("... labeled
  already, N new (M work units to label)") is printed, and the driver's peak RSS until then;
  beside it, in this process, the listing of the folder and the grouping of what is new.
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
from pipeline.labeling.inputs import expand_inputs  # noqa: E402
from pipeline.labeling.plan import WorkUnit, group_work_units, plan_work_units  # noqa: E402
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


def finished_output(first: Path, units: list[WorkUnit], output: Path, model: Path) -> None:
    """One real run on one input for a genuine marker, then that marker cloned for every unit."""
    subprocess.run(
        [ast_label, "run", str(first), "--output", str(output), "--model", str(model)],
        env=ENV,
        check=True,
        capture_output=True,
    )
    commits = output / COMMITS_DIR
    (template_path,) = commits.glob("*.json")
    template = json.loads(template_path.read_text())
    template_path.unlink()
    (output / template["file"]).unlink()
    markers = []
    for unit in units:
        marker = {**template, "unit_id": unit.unit_id, "sources": list(unit.sources)}
        marker["file"] = f"{unit.unit_id}.parquet"
        (commits / f"{unit.unit_id}.json").write_text(json.dumps(marker))
        # A rerun lists the final files' names and reads none: empty stand-ins will do.
        (output / marker["file"]).touch()
        markers.append(marker)
    time.sleep(1.1)  # the index must be newer than every marker
    location = OutputLocation.of(str(output))
    write_index(location, (CommittedUnit.from_marker(marker) for marker in markers))


def time_growth(root: Path, model: Path, files: int, new_files: int) -> None:
    """A labeled folder that grew: the plan of the next run, in a fresh CLI and in this process."""
    folder = root / "growing"
    folder.mkdir()
    for index in range(files):
        (folder / f"clip-{index:07d}.wav").touch()
    labeled = plan_work_units([str(folder)]).units
    # The template run labels one file of its own (an error row: empty files are not audio).
    seed = root / "seed" / "clip.wav"
    seed.parent.mkdir()
    seed.touch()
    finished_output(seed, labeled, root / "grown", model)
    for index in range(files, files + new_files):
        (folder / f"clip-{index:07d}.wav").touch()

    started = time.perf_counter()
    found = expand_inputs([str(folder)])
    listed = time.perf_counter() - started
    sources = {uri for unit in labeled for uri in unit.sources}
    started = time.perf_counter()
    plan = group_work_units(found, labeled=sources)
    grouped = time.perf_counter() - started
    assert plan.new_inputs == new_files, plan.new_inputs

    command = [ast_label, "run", str(folder), "--output", str(root / "grown"), "--model"]
    process = subprocess.Popen(
        [*command, str(model)],
        env=ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watch = Watch(process)
    said = ""
    for line in process.stderr:
        if "labeled already" in line:
            said = line.strip()
            break
    planned = time.perf_counter() - watch.started
    peak = watch.peak_rss
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    if not said:
        raise SystemExit("the grown run printed no plan line")
    print(
        f"growth: {files} files labeled + {new_files} new, in one folder: the CLI's plan line "
        f"{planned:.1f} s after its start (driver peak RSS {peak / 2**30:.2f} GiB); in this "
        f"process the listing took {listed:.1f} s, the grouping of what is new {grouped:.2f} s"
    )
    print(f"  it said: {said}")
    assert f"{files} labeled already, {new_files} new" in said, said


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
    lines = stderr.decode().splitlines()
    plan_line = next((line for line in lines if "labeled already" in line), lines[0])
    return elapsed, watch.peak_rss, plan_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=100_000, help="Growth: files labeled.")
    parser.add_argument("--new-files", type=int, default=1_000, help="Growth: files added.")
    parser.add_argument("--only", choices=("shards", "growth"), help="Measure one part only.")
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
        if args.only != "growth":
            time_shards(root, model, args.shards, args.before)
        if args.only != "shards":
            time_growth(root, model, args.files, args.new_files)


def time_shards(root: Path, model: Path, shards: int, before_code: Path | None) -> None:
    """Planning, start to first read, and reruns with nothing to do, at `shards` tar shards."""
    pattern = make_shards(root / "shards", shards)
    started = time.perf_counter()
    units = plan_work_units([pattern]).units
    plan_brace = time.perf_counter() - started
    started = time.perf_counter()
    plan_work_units([f"{root}/shards/*.tar"])
    plan_glob = time.perf_counter() - started
    assert len(units) == shards

    first_read, first_rss = time_to_first_read(pattern, root / "out-first", model)
    if before_code:
        before = time_to_first_read(pattern, root / "out-before", model, before_code)
    finished_output(root / "shards" / "shard-000000.tar", units, root / "done", model)
    rerun, rerun_rss, said = time_rerun(pattern, root / "done", model)
    (root / "done" / INDEX_NAME).unlink()
    rerun_cold, cold_rss, said_cold = time_rerun(pattern, root / "done", model)
    rerun_again, _, _ = time_rerun(pattern, root / "done", model)

    gib = 2**30
    print(f"{shards} tar shards (empty files), local disk; targets: <= 60 s, <= 1 GiB")
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
    if before_code:
        print(
            f"before ({before_code}): start -> first read task running: {before[0]:.1f} s; "
            f"driver peak RSS {before[1] / gib:.2f} GiB"
        )
    print(f"  it said: {said}")
    assert all(f"{shards} labeled already, 0 new" in line for line in (said, said_cold)), (
        said,
        said_cold,
    )
    assert (root / "done" / META_DIR).is_dir()


if __name__ == "__main__":
    main()
