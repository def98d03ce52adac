"""Rows per second of `ast-label relabel` (a head on an output's stored embeddings) against
`ast-label run --head` (decode, fbank, the transformer, the same head) on the same corpus.

    .venv/bin/python benchmarks/bench_relabel.py                          # tiny model, 2000 clips
    .venv/bin/python benchmarks/bench_relabel.py --clips-per-shard 500   # bigger unit files
    .venv/bin/python benchmarks/bench_relabel.py --size base --clips 200 --small-clips 50

One invocation measures, each command in a fresh process that starts its own local Ray:
- `run --head` over a small and the full corpus (10 s mono 16 kHz FLAC clips in tars of 50 by
  default, one window per clip, so a row is a clip; a tar is a unit, an output's file);
- `relabel` of the full run's output, and of that output made --copies times bigger (its committed
  units copied under new unit ids and sources: a corpus of the same clips, many times over), since
  relabel finishes the full output's rows in less time than start-up varies by.
For each command: rows/s of the full corpus with start-up included (what a user waits for), and
the marginal rate, (rows_big - rows_small) / (wall_big - wall_small), with CPU-seconds per row
from every process of the run (sampled from /proc). Relabel's cost has a part per unit file (two
durable writes: the file and its marker, each fsynced) and a part per row, so bigger tars
(--clips-per-shard) raise its rate. The ratio relabel / run is the figure the
goal is about (>= 100x): the marginal one is what a corpus of millions of rows sees.
The tiny model is the hard case for the ratio (a run costs little more than its fbank); with
AST-base the transformer's forward dominates a run and the ratio grows by its cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import (  # noqa: E402
    CLIPS_PER_SHARD,
    HF_OFFLINE,
    SIZES,
    ast_label_command,
    run_sampled,
    write_checkpoint,
    write_corpus,
)

from ast_model.checkpoint_files import read_checkpoint  # noqa: E402
from pipeline.heads.head import Head, save_head  # noqa: E402

HEAD_LABELS = ("alarm", "machine fault", "bird", "other")


@dataclass
class Timed:
    rows: int
    wall_s: float
    cpu_s: float


def random_head(folder: Path, checkpoint: Path) -> Path:
    """A head of random weights for the checkpoint: costs what a trained one costs to apply."""
    files = read_checkpoint(str(checkpoint))
    rng = np.random.default_rng(0)
    hidden = files.config.hidden_size
    head = Head(
        HEAD_LABELS,
        np.full(len(HEAD_LABELS), 0.3, np.float32),
        True,
        rng.standard_normal((len(HEAD_LABELS), hidden)).astype(np.float32),
        rng.standard_normal(len(HEAD_LABELS)).astype(np.float32),
        {"name": "bench", "weights_sha256": files.weights_sha256, "hidden_size": hidden},
    )
    save_head(head, str(folder), "# a benchmark head of random weights\n")
    return folder


def copy_output(source: Path, target: Path, copies: int) -> None:
    """The source output `copies` times over: each committed unit file and its marker under new
    unit ids (`<unit>-copy<k>`) and sources (`<uri>#copy<k>`); no index, so markers are read."""
    shutil.copytree(source, target)
    (target / ".ast-label" / "index.jsonl.gz").unlink(missing_ok=True)
    commits = target / ".ast-label" / "commits"
    for marker_path in sorted(commits.glob("*.json")):
        marker = json.loads(marker_path.read_text())
        for k in range(1, copies):
            unit_id = f"{marker['unit_id']}-copy{k}"
            copy = {
                **marker,
                "unit_id": unit_id,
                "file": f"{unit_id}.parquet",
                "sources": [f"{uri}#copy{k}" for uri in marker["sources"]],
            }
            shutil.copyfile(target / marker["file"], target / copy["file"])
            (commits / f"{unit_id}.json").write_text(json.dumps(copy))


def timed_command(arguments: list[str], output: Path) -> Timed:
    """One `ast-label` command in a fresh session: wall time, CPU of all its processes, rows."""
    env = {**os.environ, **HF_OFFLINE, "RAY_ADDRESS": ""}
    returncode, stderr, wall, sampler = run_sampled([*ast_label_command(), *arguments], env)
    if returncode != 0:
        raise SystemExit(f"ast-label {arguments[0]} failed:\n{stderr[-3000:]}")
    summary = json.loads((output / ".ast-label" / "summary.json").read_text())
    assert summary["errors"] == 0, summary
    return Timed(summary["windows"], wall, sampler.cpu_s)


def marginal(small: Timed, full: Timed) -> tuple[float, float]:
    """Rows per wall second and CPU-seconds per row beyond start-up."""
    rows = full.rows - small.rows
    return rows / max(full.wall_s - small.wall_s, 1e-9), (full.cpu_s - small.cpu_s) / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--clips", type=int, default=2000, help="Clips of the full corpus.")
    parser.add_argument("--small-clips", type=int, default=400, help="Clips of the small corpus.")
    parser.add_argument("--clips-per-shard", type=int, default=CLIPS_PER_SHARD)
    parser.add_argument(
        "--copies", type=int, default=20, help="Relabel's big output: the full one this many times."
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ast-label-bench-relabel-") as scratch:
        root = Path(scratch)
        checkpoint = write_checkpoint(args.size, root / "model")
        head = random_head(root / "head", checkpoint)
        write_corpus(root / "small", args.small_clips, clips_per_shard=args.clips_per_shard)
        write_corpus(root / "full", args.clips, clips_per_shard=args.clips_per_shard)
        times: dict[tuple[str, str], Timed] = {}
        for corpus in ("small", "full"):
            labeled = root / f"run-{corpus}"
            times["run", corpus] = timed_command(
                ["run", str(root / corpus), "--output", str(labeled), "--model", str(checkpoint),
                 "--head", str(head)],
                labeled,
            )  # fmt: skip
        copy_output(root / "run-full", root / "run-big", args.copies)
        for name, labeled in (("full", "run-full"), ("big", "run-big")):
            relabeled = root / f"relabel-{name}"
            times["relabel", name] = timed_command(
                ["relabel", str(root / labeled), "--head", str(head), "--output", str(relabeled)],
                relabeled,
            )

        print(f"model {args.size}; {args.clips} clips of 10 s (one row each), "
              f"{args.clips_per_shard} per tar; {os.cpu_count()} CPUs")  # fmt: skip
        rates = {}
        for command, (small_name, big_name) in (
            ("run", ("small", "full")),
            ("relabel", ("full", "big")),
        ):
            small, big = times[command, small_name], times[command, big_name]
            full = times[command, "full"]
            rows_per_s, cpu_per_row = marginal(small, big)
            rates[command] = (full.rows / full.wall_s, rows_per_s, cpu_per_row)
            print(
                f"  {command:8s} {full.rows} rows in {full.wall_s:6.1f} s wall "
                f"({full.rows / full.wall_s:9.1f} rows/s, start-up included; "
                f"{full.cpu_s:6.1f} CPU-s); marginal {rows_per_s:9.1f} rows/s, "
                f"{cpu_per_row * 1e3:7.3f} CPU-ms per row (from {small.rows} rows in "
                f"{small.wall_s:.1f} s, {small.cpu_s:.1f} CPU-s, and {big.rows} rows in "
                f"{big.wall_s:.1f} s, {big.cpu_s:.1f} CPU-s)"
            )
        run, relabel = rates["run"], rates["relabel"]
        print(
            f"relabel / run: {relabel[1] / run[1]:.0f}x rows/s marginal (goal >= 100x), "
            f"{run[2] / relabel[2]:.0f}x less CPU per row; {relabel[0] / run[0]:.1f}x with "
            f"start-up included at {args.clips} clips"
        )


if __name__ == "__main__":
    main()
