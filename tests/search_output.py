"""Outputs whose embeddings a test chooses, in the pipeline's own schema and written without Ray
(tests/labels_output.py's unit files and markers): for the search tests and
benchmarks/bench_search.py.

    files = [("clip-1", vectors (W, D)), ("broken", None), ...]   # None: an error row
    write_search_unit(out, "shard-000000", "s3://corpus/shard-000000.tar", files, LABELS)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from labels_output import spec_for, write_unit

WINDOW_S = 10.24


def search_unit_table(
    shard: str,
    files: Sequence[tuple[str, np.ndarray | None]],
    label_names: Sequence[str],
    seed: int = 0,
) -> pa.Table:
    """One unit's rows, files in key order: W windows of 10.24 s per file (the last 1 s
    shorter), scores peaked on one label per file, an error row for a file without vectors."""
    rng = np.random.default_rng(seed)
    files = sorted(files, key=lambda item: item[0])
    dim = next((len(v[0]) for _, v in files if v is not None and len(v)), 4)
    spec = spec_for(label_names, hidden=dim)
    columns: dict[str, list] = {name: [] for name in spec.schema.names}
    for key, vectors in files:
        windows = 1 if vectors is None else len(vectors)
        duration = windows * WINDOW_S - 1.0
        peak = int(rng.integers(len(label_names)))
        for index in range(windows):
            failed = vectors is None
            scores = rng.random(len(label_names)).astype(np.float32) * 0.2
            scores[peak] = 0.9
            top = np.argsort(-scores, kind="stable")[:3]
            start = index * WINDOW_S
            columns["shard"].append(shard)
            columns["key"].append(key)
            columns["window_index"].append(index)
            columns["start_s"].append(0.0 if failed else start)
            columns["end_s"].append(0.0 if failed else min(start + WINDOW_S, duration))
            columns["duration_s"].append(0.0 if failed else duration)
            columns["sample_rate"].append(16_000)
            columns["embedding"].append(None if failed else np.asarray(vectors[index]).tolist())
            columns["scores"].append(None if failed else scores.tolist())
            columns["top_labels"].append(None if failed else [label_names[i] for i in top])
            columns["top_scores"].append(None if failed else scores[top].tolist())
            columns["metadata"].append(None)
            columns["error"].append("cannot decode" if failed else None)
    return pa.Table.from_pydict(columns, schema=spec.schema)


def write_search_unit(
    output_uri: str,
    unit_id: str,
    shard: str,
    files: Sequence[tuple[str, np.ndarray | None]],
    label_names: Sequence[str],
    seed: int = 0,
) -> None:
    write_unit(output_uri, unit_id, search_unit_table(shard, files, label_names, seed))


def clustered_vectors(
    count: int, centres: np.ndarray, rng: np.random.Generator, spread: float = 0.5
) -> np.ndarray:
    """(count, D) float32 around randomly chosen `centres` (C, D): neighbours that mean
    something, as real embeddings have."""
    chosen = centres[rng.integers(len(centres), size=count)]
    return (chosen + spread * rng.standard_normal(chosen.shape)).astype(np.float32)
