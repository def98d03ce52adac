"""A run killed with SIGKILL part way and started again labels every file exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from audio_corpus import encode, sine, tar_bytes
from processes import kill_session, session_pids

from pipeline.labeling.run import run_labeling
from pipeline.settings import LabelingOptions, RunConfig

pytestmark = pytest.mark.slow

SHARDS = 8
CLIPS_PER_SHARD = 6


def write_corpus(folder: Path, shards: int = SHARDS) -> None:
    folder.mkdir(parents=True)
    for shard in range(shards):
        entries = []
        for clip in range(CLIPS_PER_SHARD):
            seconds = 1.0 + (shard * CLIPS_PER_SHARD + clip) % 7 * 2.5  # some clips need 2 windows
            wave = sine(seconds, sr=22_050, freq=200.0 + 40 * clip)
            entries.append((f"c{clip:02d}.flac", encode(wave, 22_050, "flac")))
        (folder / f"shard-{shard:06d}.tar").write_bytes(tar_bytes(entries))


def ast_label_run(corpus: Path, output: Path, checkpoint: Path, shards: int = SHARDS) -> list[str]:
    executable = Path(sys.executable).with_name("ast-label")
    return [
        str(executable),
        "run",
        str(corpus / f"shard-{{000000..{shards - 1:06d}}}.tar"),
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
            r["error"],
            tuple(round(s, 5) for s in r["scores"] or ()),
        )
        for r in table.to_pylist()
    )


def committed(output: Path) -> int:
    return (
        len(list((output / ".ast-label" / "commits").glob("*.json")))
        if (output / ".ast-label" / "commits").exists()
        else 0
    )


def labeling_began(output: Path) -> bool:
    return committed(output) > 0 or any(output.glob(".ast-label/staging/*/*.parquet"))


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

    # The same run again, here on the session's Ray (a fresh Ray's start is not the point); the
    # command line's own rerun follows, with nothing left to do.
    said: list[str] = []
    second = run_labeling(
        RunConfig(
            inputs=(str(corpus / "shard-{000000..000007}.tar"),),
            output=str(output),
            options=LabelingOptions(model=str(tiny_hf_checkpoint), batch_size=4),
        ),
        echo=said.append,
    )
    assert second.complete and f"{done_at_kill} labeled already" in said[0], said
    assert sorted_rows(output) == sorted_rows(clean)
    files = {(shard, key) for shard, key, *_ in sorted_rows(output)}
    assert len(files) == SHARDS * CLIPS_PER_SHARD
    assert not list(output.glob(".ast-label/staging/*/*"))

    before = {path: path.stat().st_mtime_ns for path in output.glob("*.parquet")}
    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"{SHARDS} labeled already, 0 new (0 work units to label)" in third.stderr
    assert {path: path.stat().st_mtime_ns for path in output.glob("*.parquet")} == before


def write_clips(folder: Path, first: int, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(first, first + count):
        seconds = 1.0 + index % 4 * 4.0  # some clips need 2 windows
        wave = sine(seconds, sr=16_000, freq=150.0 + 35 * index)
        (folder / f"clip-{index:03d}.flac").write_bytes(encode(wave, 16_000, "flac"))


def file_rows(output: Path) -> list[tuple]:
    """The rows, by file: plain files are keyed by their URI (`shard` names the file group,
    which depends on when a file joined the corpus)."""
    table = pads.dataset(str(output), format="parquet").to_table()
    return sorted(
        (r["key"], r["window_index"], r["start_s"], r["end_s"], r["error"],
         tuple(round(s, 5) for s in r["scores"]))
        for r in table.to_pylist()
    )  # fmt: skip


def test_a_folder_that_grows_three_times_is_labeled_as_one_run_over_the_final_folder(
    ray_local, tmp_path, tiny_hf_checkpoint
):
    corpus, output = tmp_path / "corpus", tmp_path / "labels"
    options = LabelingOptions(model=str(tiny_hf_checkpoint), batch_size=4)

    def run_here(folder: Path, out: Path):
        config = RunConfig((str(folder),), str(out), options=options, files_per_unit=2)
        return run_labeling(config, echo=lambda line: None)

    write_clips(corpus, 0, 5)
    first = run_here(corpus, output)
    assert (first.already_labeled, first.new_inputs, first.units_labeled) == (0, 5, 3)

    write_clips(corpus, 5, 16)  # grows; the run labeling what is new is killed part way
    command = [
        str(Path(sys.executable).with_name("ast-label")), "run", str(corpus), "--output",
        str(output), "--model", str(tiny_hf_checkpoint), "--batch-size", "4",
        "--files-per-unit", "2",
    ]  # fmt: skip
    killed = subprocess.Popen(
        command,
        env={**os.environ, "RAY_ADDRESS": ""},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while committed(output) < 4 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_session(killed.pid)
    killed.wait()
    assert 4 <= committed(output) < 11, "the kill should land part way through the new units"

    again = run_here(corpus, output)
    assert again.already_labeled + again.new_inputs == 21 and again.already_labeled >= 7
    write_clips(corpus, 21, 3)  # grows a second time
    third = run_here(corpus, output)
    assert (third.already_labeled, third.new_inputs, third.gone) == (21, 3, 0)
    write_clips(corpus, 24, 2)  # and a third
    last = run_here(corpus, output)
    assert (last.already_labeled, last.new_inputs, last.gone) == (24, 2, 0)
    assert last.files == 26 and last.complete

    run_here(corpus, tmp_path / "at-once")
    assert file_rows(output) == file_rows(tmp_path / "at-once")  # each file once, same numbers
    assert not list(output.glob(".ast-label/staging/*"))
    markers = {p.stem for p in (output / ".ast-label" / "commits").glob("*.json")}
    assert markers == {p.stem for p in output.glob("*.parquet")}


def test_files_gone_from_the_input_keep_their_rows_and_the_summary_says_so(
    ray_local, tmp_path, tiny_hf_checkpoint
):
    corpus, output = tmp_path / "corpus", tmp_path / "labels"
    write_clips(corpus, 0, 3)
    options = LabelingOptions(model=str(tiny_hf_checkpoint), batch_size=4)
    config = RunConfig((str(corpus),), str(output), options=options)
    run_labeling(config, echo=lambda line: None)
    (corpus / "clip-001.flac").unlink()
    write_clips(corpus, 3, 1)
    said: list[str] = []
    summary = run_labeling(config, echo=said.append)
    assert (summary.already_labeled, summary.new_inputs, summary.gone) == (2, 1, 1)
    assert said[0] == (
        f"3 inputs: 2 labeled already, 1 new (1 work unit to label), 1 no longer in the input "
        f"(their rows stay) -> {output}"
    )
    assert summary.files == 4 and len({row[0] for row in file_rows(output)}) == 4


def test_ctrl_c_says_at_once_what_was_kept_and_leaves_no_process_of_the_run(
    tmp_path, tiny_hf_checkpoint
):
    corpus, output = tmp_path / "corpus", tmp_path / "labels"
    shards = 3 * SHARDS  # enough that the signal lands while units are still being labeled
    write_corpus(corpus, shards)
    run = subprocess.Popen(
        ast_label_run(corpus, output, tiny_hf_checkpoint, shards),
        env={**os.environ, "RAY_ADDRESS": ""},
        start_new_session=True,  # SIGINT reaches the command's main process only
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(
        target=lambda: lines.extend((time.monotonic(), line) for line in run.stderr), daemon=True
    )
    reader.start()
    # Signalled once labeling has begun (a first batch staged, or a unit committed): well before
    # the end, however the commits bunch up on a loaded machine.
    deadline = time.monotonic() + 240
    while not labeling_began(output) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before it could be interrupted"
    signalled = time.monotonic()
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130, "".join(line for _, line in lines)[-2000:]
    reader.join(timeout=10)

    said_at, said = next((at, line) for at, line in lines if line.startswith("Error: interrupted"))
    assert said_at - signalled < 1.0, said
    kept = committed(output)
    assert f"Error: interrupted: {kept} of {shards} work units labeled and committed" in said
    assert "run the same command again to go on from there" in said
    assert not session_pids(run.pid), "a process of the run outlived it"
