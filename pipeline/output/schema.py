"""The output's columns and file metadata, and how a batch of result rows becomes them.

One row per (input file, window), see `output_schema`; every unit file carries the run's
description (model, weights sha256, label names, feature and window settings, package version)
as JSON under the metadata key b"ast_label", and a fingerprint of everything in it that decides
a row's numbers, which a resumed run must match.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import rows
from pipeline.heads.head import labels_at_thresholds
from pipeline.output.layout import METADATA_KEY, OutputLocation, check_name

# file_metadata entries that do not change a row's numbers, left out of the default fingerprint:
# the same weights (or head) read from another path, or a new package release, may resume an
# output.
FINGERPRINT_IGNORES = ("model", "head_name", "package_version")
# Row groups of about 64 MiB: the pyarrow default (1 Mi rows) would make a 768-dim shard a single
# multi-GB group that readers must hold at once.
ROW_GROUP_BYTES = 64 * 2**20


HEAD_COLUMNS = ("head_scores", "head_labels")


def output_schema(hidden_size: int, num_labels: int, head_labels: int = 0) -> pa.Schema:
    """The columns of every output file, in order; with a head of `head_labels` classes, its
    columns beside the base model's. Error rows hold null vectors and label lists."""
    head = [
        pa.field("head_scores", pa.list_(pa.float32(), head_labels)),
        pa.field("head_labels", pa.list_(pa.string())),
    ]
    return pa.schema(
        [
            pa.field("shard", pa.string()),
            pa.field("key", pa.string()),
            pa.field("window_index", pa.int32()),
            pa.field("start_s", pa.float64()),
            pa.field("end_s", pa.float64()),
            pa.field("duration_s", pa.float64()),
            pa.field("sample_rate", pa.int32()),
            pa.field("embedding", pa.list_(pa.float32(), hidden_size)),
            pa.field("scores", pa.list_(pa.float32(), num_labels)),
            pa.field("top_labels", pa.list_(pa.string())),
            pa.field("top_scores", pa.list_(pa.float32())),
            *(head if head_labels else []),
            pa.field("metadata", pa.string()),
            pa.field("error", pa.string()),
        ]
    )


def fingerprint(settings: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that decides a row's numbers."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class OutputSpec:
    """What staging and committing need to know of a run's output; travels to every classifier
    actor and commit task."""

    location: OutputLocation
    run_id: str
    hidden_size: int
    num_labels: int
    # model name, weights sha256, label names, feature and window settings, package version, and
    # with a head its description (heads.head.Head.describe: sha256, label names, thresholds)
    file_metadata: dict[str, Any] = field(default_factory=dict)
    # "" -> fingerprint(file_metadata without FINGERPRINT_IGNORES)
    model_fingerprint: str = ""

    def __post_init__(self) -> None:
        if not self.model_fingerprint:
            settings = {k: v for k, v in self.file_metadata.items() if k not in FINGERPRINT_IGNORES}
            object.__setattr__(self, "model_fingerprint", fingerprint(settings))
        check_name("run id", self.run_id)

    @cached_property
    def schema(self) -> pa.Schema:
        """output_schema with the file metadata (JSON under METADATA_KEY) attached."""
        described = {**self.file_metadata, "model_fingerprint": self.model_fingerprint}
        text = json.dumps(described, sort_keys=True, default=str)
        schema = output_schema(self.hidden_size, self.num_labels, len(self.head_label_names))
        return schema.with_metadata({METADATA_KEY: text})

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.file_metadata.get("label_names", ()))

    @property
    def head_label_names(self) -> tuple[str, ...]:
        return tuple((self.file_metadata.get("head") or {}).get("label_names", ()))

    @property
    def head_thresholds(self) -> np.ndarray:
        return np.asarray((self.file_metadata.get("head") or {}).get("thresholds", ()), np.float32)

    def parquet_bytes(self, table: pa.Table) -> bytes:
        """A unit file's or staged part's bytes: zstd, row groups of about ROW_GROUP_BYTES."""
        row_bytes = 4 * (self.hidden_size + self.num_labels + len(self.head_label_names)) + 256
        buffer = io.BytesIO()
        pq.write_table(
            table,
            buffer,
            compression="zstd",
            row_group_size=max(1024, ROW_GROUP_BYTES // row_bytes),
        )
        return buffer.getvalue()


def rows_to_table(batch: rows.Batch, spec: OutputSpec) -> pa.Table:
    """A batch of classified rows (see pipeline.rows) -> a table with exactly the output schema.

    `embedding` (B, D) and `scores` (B, C) are float32; the top lists come from `top_index` (B, k)
    and the spec's label names; with a head, `head_scores` (B, H) and the head's labels at their
    thresholds. Rows whose `error` is set get null vectors and label lists (the classifier leaves
    zeros there). Columns the output does not hold (unit_id, ...) are ignored.
    """
    error = optional_strings(batch[rows.ERROR])
    failed = np.asarray(error.is_valid().to_numpy(zero_copy_only=False), dtype=bool)  # (B,)
    names = np.asarray(spec.label_names, dtype=object)
    if len(names) != spec.num_labels:
        raise ValueError(f"{spec.num_labels} labels, but file_metadata names {len(names)}")
    scores = _matrix(batch, rows.SCORES, spec.num_labels)  # (B, C)
    top_index = np.asarray(batch[rows.TOP_INDEX], dtype=np.int64)  # (B, k)
    columns = {
        "shard": pa.array(batch[rows.SHARD], type=pa.string()),
        "key": pa.array(batch[rows.KEY], type=pa.string()),
        "window_index": pa.array(batch[rows.WINDOW_INDEX], type=pa.int32()),
        "start_s": pa.array(batch[rows.START_S], type=pa.float64()),
        "end_s": pa.array(batch[rows.END_S], type=pa.float64()),
        "duration_s": pa.array(batch[rows.DURATION_S], type=pa.float64()),
        "sample_rate": pa.array(batch[rows.SAMPLE_RATE], type=pa.int32()),
        "embedding": vector_column(_matrix(batch, rows.EMBEDDING, spec.hidden_size), failed),
        "scores": vector_column(scores, failed),
        "top_labels": _rows_of(names[top_index], pa.string(), failed),
        "top_scores": _rows_of(np.take_along_axis(scores, top_index, axis=1), pa.float32(), failed),
    }
    if spec.head_label_names:
        head_scores = _matrix(batch, rows.HEAD_SCORES, len(spec.head_label_names))  # (B, H)
        columns.update(head_columns(head_scores, failed, spec))
    columns["metadata"] = optional_strings(batch[rows.METADATA])
    columns["error"] = error
    return pa.Table.from_arrays(list(columns.values()), schema=spec.schema)


def head_columns(
    head_scores: np.ndarray, null: np.ndarray, spec: OutputSpec
) -> dict[str, pa.Array]:
    """(B, H) head scores -> the head's two columns: the scores, and each row's labels at or above
    their thresholds, best first; rows where `null` is set null in both."""
    labels = labels_at_thresholds(head_scores, spec.head_thresholds, spec.head_label_names)
    return {
        "head_scores": vector_column(head_scores, null),
        "head_labels": pa.array(
            [None if skip else names for names, skip in zip(labels, null, strict=True)],
            type=pa.list_(pa.string()),
        ),
    }


def optional_strings(values: Sequence) -> pa.Array:
    """A nullable string column: the stages carry null as "" (see pipeline.rows), and a block
    whose values were all None reaches numpy as NaN floats; both mean null."""
    strings = [value if isinstance(value, str) and value else None for value in values]
    return pa.array(strings, type=pa.string())


def vector_column(matrix: np.ndarray, null: np.ndarray) -> pa.FixedSizeListArray:
    """(B, D) float32 -> fixed_size_list<float32>[D], rows where `null` is set left null."""
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))  # (B * D,)
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1], mask=pa.array(null))


def _matrix(batch: rows.Batch, name: str, width: int) -> np.ndarray:
    values = np.asarray(batch[name])
    expected = (len(batch[rows.KEY]), width)
    if values.shape != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {values.shape}")
    return values.astype(np.float32, copy=False)


def _rows_of(matrix: np.ndarray, value_type: pa.DataType, null: np.ndarray) -> pa.ListArray:
    """(B, k) -> list<value_type>, one list of k values per row; rows where `null` is set null
    (and hold no values)."""
    lengths = np.where(null, 0, matrix.shape[1])  # (B,)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(matrix[~null].reshape(-1), type=value_type)
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(null))
