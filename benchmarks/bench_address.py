"""Testing on samples: `ast-label run --address` against a Ray kept running on this machine
(`ray start --head`) beside `ast-label run` starting a local Ray of its own, on the same clips.

    .venv/bin/python benchmarks/bench_address.py                 # 200 clips, 3 runs each way
    .venv/bin/python benchmarks/bench_address.py --clips 50 --runs 5

Each run labels the same corpus (10 s mono FLAC clips, tiny model) into a new output. Reported per
run: wall seconds, seconds from the command's start until its first classified batch was staged
in the output, and CPU-seconds of every process involved: the command's own session, and for
--address runs the kept Ray's processes too (the workers that Ray starts for the run live there),
counted from their CPU before the run. `ray start --head` itself is timed once. The machine
should be otherwise idle: first-batch times are wall times.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import (  # noqa: E402
    CLOCK_TICKS,
    SessionSampler,
    ast_label_command,
    run_sampled,
    write_checkpoint,
    write_corpus,
)

VENV_BIN = Path(sys.executable).parent


def session_ticks(session_id: int) -> dict[tuple[int, int], int]:
    """(pid, start time) -> utime + stime of every live process of a session."""
    ticks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:
            ticks[(int(stat.parent.name), int(fields[19]))] = int(fields[11]) + int(fields[12])
    return ticks


def start_head(temp_dir: Path) -> tuple[subprocess.Popen, str, float, float]:
    """`ray start --head` in a session of its own: (process, address, wall s, CPU-s to ready)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--port=0",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    output, _ = process.communicate(timeout=180)
    match = re.search(r"--address='([^']+)'", output)
    if process.returncode != 0 or match is None:
        raise SystemExit(f"ray start --head failed:\n{output}")
    wall = time.perf_counter() - started
    return process, match.group(1), wall, sum(session_ticks(process.pid).values()) / CLOCK_TICKS


def stop_session(session_id: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, _ in session_ticks(session_id):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2.0)


def one_run(
    command: list[str], output: Path, head_session: int | None
) -> tuple[float, float, float]:
    """(wall s, first batch s, CPU-s) of one `ast-label run`."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    head = None
    if head_session is not None:
        before = session_ticks(head_session)
        head = SessionSampler(head_session, memory=False)
        head.thread.start()
    status, stderr, wall, sampler = run_sampled(command, env, output=output)
    if status != 0:
        raise SystemExit(f"ast-label run failed ({status}):\n{stderr[-3000:]}")
    cpu = sampler.cpu_s
    if head is not None:
        time.sleep(1.0)  # the run's workers end after it; let the sampler see their last ticks
        head.stop.set()
        head.thread.join()
        cpu += sum(t - before.get(key, 0) for key, t in head.cpu_ticks.items()) / CLOCK_TICKS
    return wall, sampler.first_output_s, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3, help="Runs each way.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="astl-addr-", dir="/tmp"))  # short: Ray's socket paths
    try:
        corpus = work / "corpus"
        write_corpus(corpus, args.clips)
        checkpoint = write_checkpoint("tiny", work / "model")

        def command(output: Path, *extra: str) -> list[str]:
            return [*ast_label_command(), "run", str(corpus), "--output", str(output),
                    "--model", str(checkpoint), *extra]  # fmt: skip

        rows = []
        for index in range(args.runs):
            output = work / f"local-{index}"
            rows.append(("local Ray", *one_run(command(output), output, None)))
        head, address, head_wall, head_cpu = start_head(work / "ray")
        try:
            for index in range(args.runs):
                output = work / f"address-{index}"
                rows.append(
                    ("--address", *one_run(command(output, "--address", address), output, head.pid))
                )
        finally:
            stop_session(head.pid)

        print(f"tiny model; {args.clips} clips of 10 s; {os.cpu_count()} CPUs")
        print(f"ray start --head: ready after {head_wall:.1f} s, {head_cpu:.1f} CPU-s (once)")
        print(f"{'run':<10} {'wall s':>7} {'first batch s':>14} {'CPU-s':>7}")
        for mode, wall, first, cpu in rows:
            print(f"{mode:<10} {wall:7.1f} {first:14.1f} {cpu:7.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
