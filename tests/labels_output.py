"""Outputs in the pipeline's own schema written without Ray: a unit file and its marker, and a
synthetic output of any size (for the inspect tests and benchmarks/bench_inspect.py)."""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.output.layout import COMMITS_DIR, OutputLocation
from pipeline.output.schema import OutputSpec
from pipeline.storage import filesystem_for


def spec_for(label_names, hidden: int = 4) -> OutputSpec:
    return OutputSpec(
        location=OutputLocation.of("/unused"),
        run_id="test",
        hidden_size=hidden,
        num_labels=len(label_names),
        file_metadata={
            "model": "test-model",
            "weights_sha256": "0" * 64,
            "label_names": list(label_names),
            "multi_label": True,
        },
    )


def write_unit(output_uri: str, unit_id: str, table: pa.Table, marker: bool = True) -> None:
    """A unit file at the top of the output and (unless marker=False) its commit marker."""
    fs, root = filesystem_for(output_uri)
    fs.makedirs(posixpath.join(root, COMMITS_DIR), exist_ok=True)
    with fs.open(posixpath.join(root, f"{unit_id}.parquet"), "wb") as handle:
        pq.write_table(table, handle, compression="zstd")
    if marker:
        fs.pipe_file(
            posixpath.join(root, COMMITS_DIR, f"{unit_id}.json"),
            json.dumps({"unit_id": unit_id}).encode(),
        )


def synthetic_output(
    output_uri: str,
    rows: int,
    label_names,
    hidden: int = 8,
    units: int = 100,
    seed: int = 0,
) -> int:
    """`rows` rows in `units` unit files, built with numpy (no Python per row): files of 1 to 36
    windows of 10.24 s, some error rows, scores peaked on one label per file. Returns the rows."""
    rng = np.random.default_rng(seed)
    spec = spec_for(label_names, hidden)
    num_labels = len(label_names)
    written = 0
    for unit in range(units):
        target = rows // units
        windows = np.minimum(rng.geometric(0.3, size=target), 36)  # (F,) windows per file
        windows = windows[: np.searchsorted(np.cumsum(windows), target) + 1]
        windows[-1] -= max(0, windows.sum() - target)
        windows = windows[windows > 0]
        failed = (rng.random(len(windows)) < 0.05) & (windows == 1)  # an error row per such file
        count = int(windows.sum())
        file_of_row = np.repeat(np.arange(len(windows)), windows)  # (N,)
        window_index = np.arange(count) - np.repeat(np.cumsum(windows) - windows, windows)
        duration = np.repeat(windows * 10.24 - rng.random(len(windows)) * 5, windows)
        start = window_index * 10.24
        end = np.minimum(start + 10.24, duration)
        error_row = failed[file_of_row]
        scores = rng.random((count, num_labels), dtype=np.float32) * 0.2  # (N, C)
        peak = rng.integers(num_labels, size=len(windows))[file_of_row]
        scores[np.arange(count), peak] = rng.uniform(0.3, 1.0, count).astype(np.float32)
        mask = pa.array(error_row)
        keys = pa.array([f"clip-{i:05d}" for i in range(len(windows))]).take(pa.array(file_of_row))
        columns = {
            "shard": pa.array(np.full(count, f"s3://corpus/shard-{unit:06d}.tar")),
            "key": keys,
            "window_index": pa.array(window_index.astype(np.int32)),
            "start_s": pa.array(np.where(error_row, 0.0, start)),
            "end_s": pa.array(np.where(error_row, 0.0, end)),
            "duration_s": pa.array(np.where(error_row, 0.0, duration)),
            "sample_rate": pa.array(np.full(count, 16000, np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.random(count * hidden, dtype=np.float32)), hidden, mask=mask
            ),
            "scores": pa.FixedSizeListArray.from_arrays(
                pa.array(scores.reshape(-1)), num_labels, mask=mask
            ),
            "top_labels": pa.nulls(count, pa.list_(pa.string())),
            "top_scores": pa.nulls(count, pa.list_(pa.float32())),
            "metadata": pa.nulls(count, pa.string()),
            "error": pa.array(np.where(error_row, "cannot decode", None)),
        }
        table = pa.Table.from_arrays(list(columns.values()), schema=spec.schema)
        write_unit(output_uri, f"shard-{unit:06d}", table)
        written += count
    return written
