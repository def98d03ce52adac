"""`ast-label inspect` on a large output: seconds for counts, the label distribution, a label
query and timelines, beside reading the same columns with pyarrow alone, in the same invocation.

    .venv/bin/python benchmarks/bench_inspect.py                 # 100k rows, 527 labels
    .venv/bin/python benchmarks/bench_inspect.py --rows 1000000

The output is synthetic (tests/labels_output.py: the pipeline's own schema, files of 1-36
windows, some error rows), written to a temporary folder on local disk.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from labels_output import synthetic_output  # noqa: E402

from pipeline.commands.inspection import SCAN_COLUMNS, inspect_output  # noqa: E402

LABELS = 527  # AudioSet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--units", type=int, default=100, help="Unit files of the output.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    label_names = tuple(f"label {i}" for i in range(LABELS))
    with tempfile.TemporaryDirectory() as folder:
        output = str(Path(folder) / "out")
        rows = synthetic_output(output, args.rows, label_names, units=args.units)
        files = sorted(Path(output).glob("*.parquet"))

        def read_columns() -> None:
            for path in files:
                pq.read_table(path, columns=list(SCAN_COLUMNS))

        def inspect() -> None:
            inspect_output(output, "label 7", 0.9, timelines=6)

        floor = min(_seconds(read_columns) for _ in range(args.repeats))
        ours = min(_seconds(inspect) for _ in range(args.repeats))
        started = time.perf_counter()
        subprocess.run(
            [str(Path(sys.executable).with_name("ast-label")), "inspect", output, "-l", "label 7"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        cli = time.perf_counter() - started

    print(f"{rows} rows in {len(files)} unit files, {LABELS} labels (best of {args.repeats})")
    print(f"  pyarrow: read the columns inspect scans   {floor:6.2f} s")
    print(f"  inspect_output (counts, query, timelines) {ours:6.2f} s = {ours / floor:.1f}x")
    print(f"  `ast-label inspect -l`, start-up included  {cli:6.2f} s")


def _seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
