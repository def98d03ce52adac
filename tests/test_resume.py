"""A run killed with SIGKILL part way and started again labels every file exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from audio_corpus import encode, sine, tar_bytes

from pipeline.labeling.run import run_labeling
from pipeline.settings import LabelingOptions, RunConfig

pytestmark = pytest.mark.slow

SHARDS = 8
CLIPS_PER_SHARD = 6


def write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True)
    for shard in range(SHARDS):
        entries = []
        for clip in range(CLIPS_PER_SHARD):
            seconds = 1.0 + (shard * CLIPS_PER_SHARD + clip) % 7 * 2.5  # some clips need 2 windows
            wave = sine(seconds, sr=22_050, freq=200.0 + 40 * clip)
            entries.append((f"c{clip:02d}.flac", encode(wave, 22_050, "flac")))
        (folder / f"shard-{shard:06d}.tar").write_bytes(tar_bytes(entries))


def ast_label_run(corpus: Path, output: Path, checkpoint: Path) -> list[str]:
    executable = Path(sys.executable).with_name("ast-label")
    return [
        str(executable),
        "run",
        str(corpus / "shard-{000000..000007}.tar"),
        "--output",
        str(output),
        "--model",
        str(checkpoint),
        "--batch-size",
        "4",
    ]


def sorted_rows(output: Path) -> list[tuple]:
    table = pads.dataset(str(output), format="parquet").to_table()
    table = table.select(["shard", "key", "window_index", "start_s", "end_s", "scores", "error"])
    return sorted(
        (
            r["shard"],
            r["key"],
            r["window_index"],
            r["start_s"],
            r["end_s"],
            tuple(round(s, 5) for s in r["scores"]),
        )
        for r in table.to_pylist()
    )


def committed(output: Path) -> int:
    return (
        len(list((output / ".ast-label" / "commits").glob("*.json")))
        if (output / ".ast-label" / "commits").exists()
        else 0
    )


def session_pids(session_id: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Fields 3 and 6 of /proc/PID/stat: the state (Z: dead, awaiting its parent) and session.
        if int(fields[3]) == session_id and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(session_id: int) -> None:
    """SIGKILL to the driver and every Ray process it started (Ray workers get process groups of
    their own, so killpg alone would miss them), as when the machine dies."""
    deadline = time.monotonic() + 30
    while (pids := session_pids(session_id)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    assert not session_pids(session_id), "processes of the killed run survived"


def test_rerun_after_kill_writes_each_file_once(ray_local, tmp_path, tiny_hf_checkpoint):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    clean = tmp_path / "clean"
    run_labeling(
        RunConfig(
            inputs=(str(corpus / "shard-{000000..000007}.tar"),),
            output=str(clean),
            options=LabelingOptions(model=str(tiny_hf_checkpoint), batch_size=4),
        ),
        echo=lambda line: None,
    )
    output = tmp_path / "killed"
    command = ast_label_run(corpus, output, tiny_hf_checkpoint)
    env = {**os.environ, "RAY_ADDRESS": ""}

    # Its own session, so that the kill below finds every process of the run.
    first = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while committed(output) < 1 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_session(first.pid)
    first.wait()
    done_at_kill = committed(output)
    assert 1 <= done_at_kill < SHARDS, "the kill should land part way through the run"

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{done_at_kill} already committed" in second.stderr
    assert sorted_rows(output) == sorted_rows(clean)
    files = {(shard, key) for shard, key, *_ in sorted_rows(output)}
    assert len(files) == SHARDS * CLIPS_PER_SHARD
    assert not list(output.glob(".ast-label/staging/*/*"))

    before = {path: path.stat().st_mtime_ns for path in output.glob("*.parquet")}
    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"{SHARDS} already committed, 0 to label" in third.stderr
    assert {path: path.stat().st_mtime_ns for path in output.glob("*.parquet")} == before
