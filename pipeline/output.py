"""Parquet output with an exactly-once commit per work unit.

Layout under the output URI OUT:

    OUT/<unit_id>.parquet                           final rows of one unit, sorted by key, window
    OUT/.ast-label/staging/<unit_id>/<run>-<uuid>.parquet   parts written by the Ray write stage
    OUT/.ast-label/commits/<unit_id>.json           the commit marker: the unit is done
    OUT/.ast-label/index.jsonl.gz                   every marker of the output, in one file
    OUT/.ast-label/summary.json                     the last run's summary
    OUT/.ast-label/ray-data-stats.txt               the last run's per-stage times (Ray Data)
    OUT/.ast-label/labels.csv                       index,name of every label: for SQL queries

Only the data sits at the top, so every Parquet reader takes OUT as it is (pyarrow.dataset,
pandas, DuckDB's `OUT/*.parquet`, Ray, Hugging Face `datasets`): they all skip hidden folders.

Protocol: write tasks stage parts (any number per unit, from any batch); the driver counts staged
rows per unit (`CommitTracker`) and, once a unit's total is in, `commit_unit` merges exactly the
parts it was told about into one file written in a single atomic step, then writes the marker.
A rerun skips units whose marker matches (`check_resume`) and redoes the rest, overwriting the same
deterministic file names, so nothing is duplicated or lost whatever point a run was killed at.
A unit whose storage failed (see pipeline.rows) is never committed; its staging is removed.

The index is a cache of the markers, never the commit point: a rerun lists the markers (one LIST
per 1000 on S3), takes the fields of those older than the index from it, and reads only the rest.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import re
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from types import MappingProxyType
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline import rows as R
from pipeline.defaults import META_DIR
from pipeline.errors import UserError
from pipeline.storage import (
    StorageError,
    error_reason,
    filesystem_for,
    join_uri,
    list_folder,
    uri_for,
    with_retries,
)

log = logging.getLogger(__name__)

METADATA_KEY = b"ast_label"
# Everything but the data lives in one hidden folder (META_DIR), which every Parquet reader skips.
STAGING_DIR = f"{META_DIR}/staging"
COMMITS_DIR = f"{META_DIR}/commits"
INDEX_NAME = f"{META_DIR}/index.jsonl.gz"
SUMMARY_NAME = f"{META_DIR}/summary.json"
STATS_NAME = f"{META_DIR}/ray-data-stats.txt"
# `index,name`, one row per label in score order (index 0-based; SQL lists are 1-based).
LABELS_TABLE_NAME = f"{META_DIR}/labels.csv"
MARKER_VERSION = 2

# S3 part size for final files: files under twice this go up in one PUT, bigger ones as a multipart
# upload that becomes visible only when completed (s3fs aborts it on failure). 8 MiB parts keep a
# retried part cheap; S3's minimum is 5 MiB.
S3_PART_BYTES = 8 * 2**20
# Row groups of about 64 MiB: the pyarrow default (1 Mi rows) would make a 768-dim shard a single
# multi-GB group that readers must hold at once.
ROW_GROUP_BYTES = 64 * 2**20
# file_metadata entries that do not change a row's numbers, left out of the default fingerprint:
# the same weights read from another path, or a new package release, may resume an output.
FINGERPRINT_IGNORES = ("model", "package_version")
# Distinct error reasons kept per marker; the rest are counted under one entry.
MAX_ERROR_REASONS = 50
# Markers the index did not cover, read at the start of a run, beyond which it is rewritten at once.
INDEX_REFRESH_AFTER = 1000

# Unit ids become file names; a leading "_" or "." would hide the final file from readers.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_GLOB_CHARS = re.compile(r"[*?\[]")


class OutputError(UserError):
    """The output location cannot take this run's results (missing bucket, no write access, a file
    in the way, another model's results, changed input grouping); the message says what to do."""


def output_schema(hidden_size: int, num_labels: int) -> pa.Schema:
    """The columns of every output file, in order. Error rows hold null vectors and top lists."""
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
    """What the write and commit steps need; pickled into every Ray write/commit task."""

    output_uri: str
    run_id: str
    hidden_size: int
    num_labels: int
    # model name, weights sha256, label names, feature and window settings, package version
    file_metadata: dict[str, Any] = field(default_factory=dict)
    # "" -> fingerprint(file_metadata without FINGERPRINT_IGNORES)
    model_fingerprint: str = ""

    def __post_init__(self) -> None:
        uri = self.output_uri.rstrip("/")
        if "://" not in uri:
            # Ray workers may run in another working directory than the driver.
            uri = os.path.abspath(uri)
        object.__setattr__(self, "output_uri", uri)
        if not self.model_fingerprint:
            settings = {k: v for k, v in self.file_metadata.items() if k not in FINGERPRINT_IGNORES}
            object.__setattr__(self, "model_fingerprint", fingerprint(settings))
        _check_name("run id", self.run_id)

    @cached_property
    def schema(self) -> pa.Schema:
        """output_schema with the file metadata (JSON under b"ast_label") attached."""
        described = {**self.file_metadata, "model_fingerprint": self.model_fingerprint}
        text = json.dumps(described, sort_keys=True, default=str)
        return output_schema(self.hidden_size, self.num_labels).with_metadata({METADATA_KEY: text})

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.file_metadata.get("label_names", ()))


# --- rows -> Arrow ------------------------------------------------------------------------------


def rows_to_table(batch: R.Batch, spec: OutputSpec) -> pa.Table:
    """A numpy batch of result rows (see pipeline.rows) -> a table with exactly the output schema.

    Vectors come as (B, D) float arrays or object arrays with None on error rows. Top lists come as
    `top_labels`/`top_scores` (object arrays of lists, or (B, k) arrays), or are derived from
    `top_index` (B, k) with the spec's label names. Every row whose `error` is set gets null
    vectors and top lists whatever the batch holds there (the classifier fills zeros for them).
    Extra columns (unit_id, unit_rows, ...) are ignored. NaN in the float columns becomes null.
    """
    error = optional_strings(batch[R.ERROR])
    failed = np.asarray(error.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    top_labels, top_scores = _top_lists(batch, spec)
    columns = {
        "shard": pa.array(batch[R.SHARD], type=pa.string()),
        "key": pa.array(batch[R.KEY], type=pa.string()),
        "window_index": pa.array(batch[R.WINDOW_INDEX], type=pa.int32()),
        "start_s": pa.array(batch[R.START_S], type=pa.float64(), from_pandas=True),
        "end_s": pa.array(batch[R.END_S], type=pa.float64(), from_pandas=True),
        "duration_s": pa.array(batch[R.DURATION_S], type=pa.float64(), from_pandas=True),
        "sample_rate": pa.array(batch[R.SAMPLE_RATE], type=pa.int32()),
        "embedding": _vector_column(batch, R.EMBEDDING, spec.hidden_size, failed),
        "scores": _vector_column(batch, R.SCORES, spec.num_labels, failed),
        "top_labels": _list_column(top_labels, pa.string(), failed, batch, "top_labels"),
        "top_scores": _list_column(top_scores, pa.float32(), failed, batch, "top_scores"),
        "metadata": optional_strings(batch[R.METADATA]),
        "error": error,
    }
    return pa.Table.from_arrays(list(columns.values()), schema=spec.schema)


def optional_strings(values: Sequence) -> pa.Array:
    """A nullable string column: the stages carry null as "" (see pipeline.rows), and a block
    whose values were all None reaches numpy as NaN floats; both mean null."""
    strings = [value if isinstance(value, str) and value else None for value in values]
    return pa.array(strings, type=pa.string())


def _top_lists(batch: R.Batch, spec: OutputSpec) -> tuple[Sequence, Sequence]:
    if "top_labels" in batch:
        return batch["top_labels"], batch["top_scores"]
    top_index = np.asarray(batch[R.TOP_INDEX], dtype=np.int64)  # (B, k)
    names = np.asarray(spec.label_names, dtype=object)
    if len(names) != spec.num_labels:
        raise ValueError(
            f"top_index needs {spec.num_labels} label names, file_metadata has {len(names)}"
        )
    scores = _dense_or_none(batch[R.SCORES], spec.num_labels)
    return names[top_index], np.take_along_axis(scores, top_index, axis=1)


def _dense_or_none(values: np.ndarray, size: int) -> np.ndarray:
    """(B, size) float32; object rows that are None become zeros (only error rows may be None)."""
    if values.dtype != object:
        return values
    dense = np.zeros((len(values), size), dtype=np.float32)
    for i, vector in enumerate(values):
        if vector is not None:
            dense[i] = vector
    return dense


def _vector_column(batch: R.Batch, name: str, size: int, failed: np.ndarray) -> pa.Array:
    values = batch[name]
    count = len(failed)
    if values.dtype != object:
        if values.shape != (count, size):
            raise ValueError(f"{name}: expected shape ({count}, {size}), got {values.shape}")
        matrix = values.astype(np.float32, copy=False)
    else:
        matrix = np.zeros((count, size), dtype=np.float32)
        for i, vector in enumerate(values):
            if failed[i]:
                continue
            if vector is None:
                raise ValueError(
                    f"{name}: row {i} (key {batch['key'][i]!r}) has no vector and no error"
                )
            vector = np.asarray(vector, dtype=np.float32)
            if vector.shape != (size,):
                raise ValueError(f"{name}: row {i} has shape {vector.shape}, expected ({size},)")
            matrix[i] = vector
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1))  # (B * size,)
    return pa.FixedSizeListArray.from_arrays(flat, size, mask=pa.array(failed))


def _list_column(
    values: Sequence, value_type: pa.DataType, failed: np.ndarray, batch: R.Batch, name: str
) -> pa.Array:
    items: list[np.ndarray | None] = []
    for i, value in enumerate(values):
        if failed[i]:
            items.append(None)
        elif value is None:
            raise ValueError(f"{name}: row {i} (key {batch['key'][i]!r}) has no list and no error")
        else:
            items.append(np.asarray(value).reshape(-1))
    offsets = np.zeros(len(items) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([0 if item is None else len(item) for item in items])
    present = [item for item in items if item is not None and len(item)]
    flat = np.concatenate(present) if present else []
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(flat, type=value_type), mask=pa.array(failed)
    )


# --- staging (inside Ray write tasks) ----------------------------------------------------------


def write_staging_parts(batch: R.Batch, spec: OutputSpec) -> dict[str, np.ndarray]:
    """Writes one staging part per unit present in the batch; returns one record per unit.

    Records: unit_id, part_uri, rows, unit_rows (the unit's total when this part holds the row
    that carries it, else 0), unit_failure (why the unit must not commit, else ""; then no part is
    written and part_uri is ""). The driver feeds them to CommitTracker.
    """
    unit_ids = np.asarray(batch[R.UNIT_ID]).astype(str)
    count = len(unit_ids)
    unit_rows = np.asarray(batch.get(R.UNIT_ROWS, np.zeros(count)), dtype=np.int64)
    unit_failure = batch.get(R.UNIT_FAILURE, np.full(count, "", dtype=object))
    ids, group_of_row = np.unique(unit_ids, return_inverse=True)
    failures = {str(unit_ids[i]): str(unit_failure[i]) for i in range(count) if unit_failure[i]}
    labeled = np.array([not failure for failure in unit_failure], dtype=bool)
    if labeled.all():  # the usual case: no copy of the batch through the mask
        table = rows_to_table(batch, spec)
    else:
        table = rows_to_table({name: values[labeled] for name, values in batch.items()}, spec)
    table_row = np.cumsum(labeled) - 1  # batch row -> its row in `table`
    fs, root = filesystem_for(spec.output_uri)
    records: dict[str, list] = {
        "unit_id": [],
        "part_uri": [],
        "rows": [],
        "unit_rows": [],
        R.UNIT_FAILURE: [],
    }
    for group, unit_id in enumerate(ids):
        _check_name("unit id", unit_id)
        rows = np.flatnonzero(group_of_row == group)
        failure, part_uri = failures.get(unit_id, ""), ""
        if not failure:
            name = f"{spec.run_id}-{uuid.uuid4().hex}.parquet"
            part_uri = join_uri(spec.output_uri, STAGING_DIR, unit_id, name)
            data = _parquet_bytes(table.take(table_row[rows]), spec)
            try:
                _put(fs, posixpath.join(root, STAGING_DIR, unit_id, name), data)
            except StorageError as error:
                failure, part_uri = f"staging write failed: {error}", ""
        records["unit_id"].append(unit_id)
        records["part_uri"].append(part_uri)
        records["rows"].append(len(rows))
        records["unit_rows"].append(int(unit_rows[rows].max()))
        records[R.UNIT_FAILURE].append(failure)
    return {
        "unit_id": np.array(records["unit_id"], dtype=object),
        "part_uri": np.array(records["part_uri"], dtype=object),
        "rows": np.array(records["rows"], dtype=np.int64),
        "unit_rows": np.array(records["unit_rows"], dtype=np.int64),
        R.UNIT_FAILURE: np.array(records[R.UNIT_FAILURE], dtype=object),
    }


# --- commit tracking (driver) ------------------------------------------------------------------


@dataclass(frozen=True)
class CompletedUnit:
    unit_id: str
    part_uris: tuple[str, ...]
    rows: int


@dataclass
class _UnitParts:
    part_uris: list[str] = field(default_factory=list)
    rows: int = 0
    total: int = 0  # 0 until the record carrying the unit's total arrives


class CommitTracker:
    """Counts staged rows per unit; a unit is complete when its total is known and all rows are in.

    Holds only units in flight: a completed unit is forgotten. A unit that fails (a record with
    `unit_failure`, or more rows than its total, which would mean rows arriving twice) is moved to
    `failed` and everything that arrives for it later is ignored: it is never committed.
    """

    def __init__(self) -> None:
        self._units: dict[str, _UnitParts] = {}
        self.failed: dict[str, str] = {}  # unit_id -> why it did not commit
        self._unreported: list[str] = []  # failed units not yet handed out by new_failures()

    def add(self, records: R.Batch) -> list[CompletedUnit]:
        completed: list[CompletedUnit] = []
        count = len(records["unit_id"])
        unit_rows = records.get("unit_rows", np.zeros(count, dtype=np.int64))
        failures = records.get(R.UNIT_FAILURE, np.full(count, "", dtype=object))
        for unit_id, part_uri, rows, total, failure in zip(
            records["unit_id"],
            records["part_uri"],
            records["rows"],
            unit_rows,
            failures,
            strict=True,
        ):
            unit_id, part_uri, rows, total = str(unit_id), str(part_uri), int(rows), int(total)
            if unit_id in self.failed:
                continue
            if failure:
                self.fail(unit_id, str(failure))
                continue
            unit = self._units.setdefault(unit_id, _UnitParts())
            if part_uri in unit.part_uris:
                continue  # the same record seen twice names the same rows: count them once
            if total and unit.total and total != unit.total:
                self.fail(unit_id, f"two different row totals, {unit.total} and {total}")
                continue
            unit.total = total or unit.total
            unit.part_uris.append(part_uri)
            unit.rows += rows
            if unit.total and unit.rows > unit.total:
                self.fail(
                    unit_id,
                    f"{unit.rows} rows staged but the unit has {unit.total} (rows arrived twice)",
                )
            elif unit.total and unit.rows == unit.total:
                completed.append(CompletedUnit(unit_id, tuple(unit.part_uris), unit.rows))
                del self._units[unit_id]
        return completed

    def fail(self, unit_id: str, reason: str) -> None:
        self._units.pop(unit_id, None)
        if unit_id not in self.failed:  # the first reason stands; a unit is reported once
            self.failed[unit_id] = reason
            self._unreported.append(unit_id)

    def new_failures(self) -> list[tuple[str, str]]:
        """(unit_id, reason) of the units failed since the last call, in the order they failed."""
        failures = [(unit_id, self.failed[unit_id]) for unit_id in self._unreported]
        self._unreported = []
        return failures

    @property
    def pending(self) -> dict[str, tuple[int, int]]:
        """unit_id -> (rows staged, total or 0 when unknown) for units not yet complete."""
        return {unit_id: (unit.rows, unit.total) for unit_id, unit in self._units.items()}


# --- commit (a plain function; the driver runs it as a Ray task) -------------------------------


def commit_unit(
    spec: OutputSpec,
    unit_id: str,
    sources: Sequence[str],
    part_uris: Sequence[str],
    expected_rows: int,
) -> dict[str, Any]:
    """Merges a unit's staged parts into OUT/<unit_id>.parquet, writes its marker, clears staging.

    The final file appears in one atomic step, then the marker (the commit point), then the unit's
    whole staging folder goes, including parts of killed earlier runs that no tracker listed.
    Committing again writes the same file bytes. Returns the marker. Raises StorageError when the
    store fails after the retries (the unit then stays uncommitted).
    """
    _check_name("unit id", unit_id)
    fs, root = filesystem_for(spec.output_uri)
    part_paths = [filesystem_for(uri)[1] for uri in part_uris]
    blobs = with_retries(
        lambda: _read_all(fs, part_paths), f"cannot read staged parts of {unit_id}"
    )
    tables = [pq.read_table(pa.BufferReader(blob)) for blob in blobs]
    table = pa.concat_tables(tables) if tables else spec.schema.empty_table()
    if table.num_rows != expected_rows:
        raise RuntimeError(
            f"unit {unit_id}: staged parts hold {table.num_rows} rows, expected {expected_rows}"
        )
    if not table.schema.equals(spec.schema, check_metadata=False):
        raise RuntimeError(f"unit {unit_id}: staged parts do not have this run's schema")
    table = _sorted(table).replace_schema_metadata(spec.schema.metadata)

    data = _parquet_bytes(table, spec)
    final = posixpath.join(root, f"{unit_id}.parquet")
    marker = {
        "version": MARKER_VERSION,
        "unit_id": unit_id,
        "sources": list(sources),
        "file": f"{unit_id}.parquet",
        "bytes": len(data),
        **_unit_counts(table),
        "model_fingerprint": spec.model_fingerprint,
        "run_id": spec.run_id,
        "committed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        _put(fs, final, data)
        _put(fs, _marker_path(root, unit_id), json.dumps(marker, indent=2, sort_keys=True).encode())
    except StorageError:
        # A write reported failed may have happened (its answer lost): take the final file away
        # again, so that readers do not see rows of a unit the run reports as not committed. A
        # marker that did get written then counts for nothing without its file: redone.
        with contextlib.suppress(Exception):
            _remove(fs, final)
        raise
    # Best effort: a rerun removes staging of committed units that a failure here left behind.
    with contextlib.suppress(Exception):
        _remove(fs, posixpath.join(root, STAGING_DIR, unit_id))
    return marker


def remove_staging(output_uri: str, unit_id: str | None) -> None:
    """Deletes a unit's staged parts (a unit that will not commit in this run), or with None the
    staging folder when it is empty; best effort."""
    fs, root = filesystem_for(output_uri)
    staging = posixpath.join(root, STAGING_DIR)
    if unit_id is None:
        _remove_if_empty(fs, staging)
        return
    with contextlib.suppress(Exception):
        _remove(fs, posixpath.join(staging, unit_id))


def _sorted(table: pa.Table) -> pa.Table:
    # error breaks the tie of a duplicate key's error row with that key's first window, so the
    # order (and the file bytes) do not depend on how batches happened to arrive. Nulls become ""
    # so the order is the same whatever pyarrow's null-placement defaults.
    sort_columns = pa.table(
        {
            "key": table["key"],
            "window_index": table["window_index"],
            "error": pc.fill_null(table["error"], ""),
        }
    )
    order = pc.sort_indices(
        sort_columns, sort_keys=[(name, "ascending") for name in sort_columns.column_names]
    )
    return table.take(order)


def _unit_counts(table: pa.Table) -> dict[str, Any]:
    """Marker counts. audio_seconds: each labeled file's source duration counted once (windows
    may overlap, so summing window lengths would count audio twice)."""
    ok = table.filter(pc.is_null(table["error"]))
    durations = ok.group_by("key").aggregate([("duration_s", "max")])["duration_s_max"]
    reasons = Counter(table["error"].drop_null().to_pylist())
    kept = dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))[:MAX_ERROR_REASONS])
    if len(reasons) > len(kept):
        kept["(other reasons)"] = sum(reasons.values()) - sum(kept.values())
    return {
        "rows": table.num_rows,
        "files": pc.count_distinct(table["key"], mode="all").as_py(),
        "windows": ok.num_rows,
        "errors": table.num_rows - ok.num_rows,
        "audio_seconds": round(float(pc.sum(durations).as_py() or 0.0), 6),
        "error_reasons": kept,
    }


def _parquet_bytes(table: pa.Table, spec: OutputSpec) -> bytes:
    row_bytes = 4 * (spec.hidden_size + spec.num_labels) + 256
    buffer = io.BytesIO()
    pq.write_table(
        table, buffer, compression="zstd", row_group_size=max(1024, ROW_GROUP_BYTES // row_bytes)
    )
    return buffer.getvalue()


# --- before a run: is the output usable, what does it hold --------------------------------------


def check_output_writable(output_uri: str) -> None:
    """Fails fast, before any Ray work, when results could not be written: a file where the
    folder should be, a missing bucket, no write or delete access, no credentials. Writes a small
    probe object under the output's hidden folder and deletes it again.

    A missing bucket or a denied access fails at once; a fault of the store (5xx, a dropped
    connection) is retried as every write is, then reported the same way.
    """
    fs, root = filesystem_for(output_uri)
    if _is_local(fs) and os.path.exists(root) and not os.path.isdir(root):
        raise OutputError(f"--output {output_uri} is a file, not a folder: give a folder or URI")
    probe = posixpath.join(root, META_DIR, f"probe-{uuid.uuid4().hex}")
    try:
        _put(fs, probe, b"ast-label write probe")
    except StorageError as error:
        # A write whose answer was lost may have happened all the same.
        with contextlib.suppress(Exception):
            fs.rm_file(probe)
        raise OutputError(
            f"cannot write to {output_uri}: {_output_problem(error.__cause__)}"
        ) from None
    try:
        with_retries(lambda: fs.rm_file(probe), f"cannot delete {probe}")
    except StorageError as error:
        raise OutputError(
            f"cannot delete from {output_uri} (runs remove their staged parts): "
            f"{_output_problem(error.__cause__)}"
        ) from None
    _remove_if_empty(fs, posixpath.join(root, META_DIR))


def _output_problem(error: BaseException | None) -> str:
    text = error_reason(error) if error is not None else "unknown error"
    lowered = text.lower()
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        return f"the bucket does not exist ({text}); create it or fix the bucket name"
    if (
        isinstance(error, PermissionError)
        or "accessdenied" in lowered
        or "access denied" in lowered
    ):
        return f"access denied ({text}); check the credentials' permissions on this prefix"
    if "credentials" in lowered:
        return (
            f"no usable AWS credentials ({text}); set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, or run where an instance profile applies"
        )
    if isinstance(error, NotADirectoryError | FileExistsError):
        return f"a file is in the way ({text}); give a folder"
    return f"{text}; check the output location and try again"


@dataclass(frozen=True, slots=True)
class CommittedUnit:
    """What a run needs of a committed unit: the fields of its marker that the resume checks and
    the summary read. It is also one line of the index. Kept small: a rerun over 100k units
    holds one per unit on the driver."""

    unit_id: str
    sources: tuple[str, ...]
    model_fingerprint: str
    files: int
    windows: int
    errors: int
    audio_seconds: float
    error_reasons: Mapping[str, int]

    @classmethod
    def from_marker(cls, marker: Mapping[str, Any]) -> CommittedUnit:
        reasons = marker.get("error_reasons") or {}
        return cls(
            unit_id=str(marker["unit_id"]),
            sources=tuple(marker.get("sources", ())),
            # Every unit of an output has the same fingerprint: one string for all of them.
            model_fingerprint=sys.intern(str(marker.get("model_fingerprint", ""))),
            files=int(marker["files"]),
            windows=int(marker["windows"]),
            errors=int(marker["errors"]),
            audio_seconds=float(marker["audio_seconds"]),
            error_reasons=dict(reasons) if reasons else _NO_REASONS,
        )

    def to_record(self) -> dict[str, Any]:
        record = {name: getattr(self, name) for name in self.__slots__}
        record["sources"] = list(self.sources)
        record["error_reasons"] = dict(self.error_reasons)
        return record


_NO_REASONS: Mapping[str, int] = MappingProxyType({})
# Markers fetched by one request batch when the index does not cover them.
_MARKER_READ_BATCH = 1000


def read_commit_markers(output_uri: str) -> dict[str, CommittedUnit]:
    """Every committed unit under OUT: the markers listed (the commit points), their fields taken
    from the index where it is newer than the marker, read otherwise. Raises StorageError when
    the output cannot be listed or read."""
    fs, root = filesystem_for(output_uri)
    commits = posixpath.join(root, COMMITS_DIR)
    listed = {
        posixpath.basename(info["name"])[: -len(".json")]: _modified_s(info)
        for info in with_retries(
            lambda: list_folder(fs, commits, detail=True), f"cannot list {commits}"
        )
        if info["name"].endswith(".json") and not posixpath.basename(info["name"]).startswith(".")
    }
    index, index_modified = _read_index(fs, root, listed)
    units = {
        unit_id: index[unit_id]
        for unit_id, modified in listed.items()
        if unit_id in index and modified is not None and modified < index_modified
    }
    del index
    missing = [unit_id for unit_id in listed if unit_id not in units]
    for start in range(0, len(missing), _MARKER_READ_BATCH):
        batch = missing[start : start + _MARKER_READ_BATCH]
        paths = [_marker_path(root, unit_id) for unit_id in batch]
        blobs = with_retries(
            functools.partial(_read_all, fs, paths), f"cannot read markers under {commits}"
        )
        for unit_id, path, blob in zip(batch, paths, blobs, strict=True):
            try:
                unit = CommittedUnit.from_marker(json.loads(blob))
                valid = unit.unit_id == unit_id
            except (ValueError, KeyError, TypeError):
                valid = False
            if valid:
                units[unit_id] = unit
            else:  # never written by commit_unit (its writes are atomic): redo that unit
                log.warning("ignoring unreadable commit marker %s", path)
    if len(missing) > INDEX_REFRESH_AFTER:
        # A run killed before writing its index: save the next run these reads. Only a cache
        # (the markers stay the commit points): a store that fails it costs a warning.
        try:
            write_index(output_uri, units.values())
        except StorageError as error:
            log.warning("could not write the markers' index (%s); the next run writes it", error)
    return units


@dataclass(frozen=True)
class Resume:
    units: dict[str, CommittedUnit]  # every committed unit of the output, planned or not
    committed: frozenset[str]  # the planned units already committed: the run skips them


def check_resume(
    output_uri: str,
    planned_units: Iterable[tuple[str, Sequence[str]]],
    model_fingerprint: str,
    overwrite: bool,
) -> Resume:
    """What the output holds already, and which planned units to skip.

    Raises OutputError when the output holds another model's/settings' results, or units that
    group this plan's inputs differently (rows would be duplicated). overwrite=True first deletes
    every ast-label file of the output (final *.parquet and the .ast-label folder; nothing else)
    and returns nothing. A marker without its final file does not count.
    """
    fs, root = filesystem_for(output_uri)
    if overwrite:
        _wipe(fs, root)
        return Resume({}, frozenset())
    plan = {unit_id: tuple(sources) for unit_id, sources in planned_units}
    units = read_commit_markers(output_uri)
    for unit_id, unit in sorted(units.items()):
        if unit.model_fingerprint != model_fingerprint:
            raise OutputError(
                f"{output_uri} holds results from another model or settings (unit {unit_id}); "
                "use --overwrite to replace them, or another output"
            )
    for unit_id, unit in sorted(units.items()):
        if unit_id in plan and set(unit.sources) != set(plan[unit_id]):
            _regrouped(output_uri, unit, set(plan[unit_id]))
    others = [unit for unit_id, unit in units.items() if unit_id not in plan]
    if others:  # units of other runs: none of them may hold an input of this plan
        planned_sources = {source for sources in plan.values() for source in sources}
        for unit in sorted(others, key=lambda unit: unit.unit_id):
            if not planned_sources.isdisjoint(unit.sources):
                _regrouped(output_uri, unit, planned_sources)
    final_files = {
        posixpath.basename(path)
        for path in with_retries(lambda: list_folder(fs, root), f"cannot list {output_uri}")
        if path.endswith(".parquet")
    }
    committed = frozenset(
        unit_id for unit_id in plan if unit_id in units and f"{unit_id}.parquet" in final_files
    )
    # Staging left by a run killed after a marker but before its cleanup: those units are skipped
    # now, so nothing else would ever remove it.
    staging = posixpath.join(root, STAGING_DIR)
    for path in with_retries(lambda: list_folder(fs, staging), f"cannot list {staging}"):
        if posixpath.basename(path) in committed:
            _remove_retried(fs, path)
    # A planned unit with a marker but no final file is redone: its old fields no longer count.
    for unit_id in plan.keys() - committed:
        units.pop(unit_id, None)
    return Resume(units, committed)


def _regrouped(output_uri: str, unit: CommittedUnit, planned_sources: set[str]) -> None:
    # A marker may list no sources (from_marker defaults them to ()): then there is no example.
    example = next((s for s in unit.sources if s in planned_sources), None)
    example = example or next(iter(unit.sources), "")
    shown = f" (e.g. {example})" if example else ""
    raise OutputError(
        f"{output_uri}: committed unit {unit.unit_id} groups the inputs differently from this "
        f"run{shown}, so rows would be duplicated; use --overwrite or another output"
    )


def write_index(output_uri: str, units: Iterable[CommittedUnit]) -> None:
    """Saves every committed unit of the output in one file, so that a rerun need not read every
    marker: gzip of JSON lines, a few MB for 100k tar shards."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=5, mtime=0) as compressed:
        for unit in units:
            compressed.write(json.dumps(unit.to_record(), sort_keys=True).encode() + b"\n")
    fs, root = filesystem_for(output_uri)
    _put(fs, posixpath.join(root, INDEX_NAME), buffer.getvalue())


def _read_index(
    fs: fsspec.AbstractFileSystem, root: str, wanted: Mapping[str, Any]
) -> tuple[dict[str, CommittedUnit], float]:
    """(unit_id -> unit for the `wanted` ids it holds, the index's modification time); ({}, -inf)
    when there is no usable index. Parsed line by line: the whole text is never held at once."""
    path = posixpath.join(root, INDEX_NAME)
    try:
        modified = _modified_s(with_retries(lambda: fs.info(path), f"cannot read {path}"))
        data = with_retries(lambda: fs.cat_file(path), f"cannot read {path}")
        index = {}
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as lines:
            for line in lines:
                if line.strip():
                    unit = CommittedUnit.from_marker(json.loads(line))
                    if unit.unit_id in wanted:
                        index[unit.unit_id] = unit
    except StorageError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            return {}, -math.inf
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable index %s", path)
        return {}, -math.inf
    return index, (modified if modified is not None else -math.inf)


def _modified_s(info: Mapping[str, Any]) -> float | None:
    """A listing entry's modification time in seconds (local mtime, S3 LastModified)."""
    if "mtime" in info:
        return float(info["mtime"])
    modified = info.get("LastModified") or info.get("last_modified")
    if isinstance(modified, datetime):
        return modified.timestamp()
    return None


def write_summary(output_uri: str, summary: Mapping[str, Any]) -> None:
    fs, root = filesystem_for(output_uri)
    _put(
        fs,
        posixpath.join(root, SUMMARY_NAME),
        json.dumps(summary, indent=2, sort_keys=True).encode(),
    )


def labels_table_csv(label_names: Sequence[str]) -> bytes:
    """`index,name` CSV, one row per label in score order; names quoted where CSV needs it."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["index", "name"])
    writer.writerows(enumerate(label_names))
    return text.getvalue().encode()


def write_labels_table(output_uri: str, label_names: Sequence[str]) -> str:
    """Writes OUT/.ast-label/labels.csv, the same names as every file's metadata, so that a query
    can find a label's index in `scores` by name (`scores[index + 1]` in SQL). Returns its URI."""
    fs, root = filesystem_for(output_uri)
    _put(fs, posixpath.join(root, LABELS_TABLE_NAME), labels_table_csv(label_names))
    return join_uri(output_uri, LABELS_TABLE_NAME)


def write_stats(output_uri: str, text: str) -> None:
    """Ray Data's per-operator statistics of the last run: where the time went."""
    fs, root = filesystem_for(output_uri)
    _put(fs, posixpath.join(root, STATS_NAME), text.encode())


def _wipe(fs: fsspec.AbstractFileSystem, root: str) -> None:
    # Markers first: a wipe killed halfway leaves no marker pointing at a deleted file.
    _remove_retried(fs, posixpath.join(root, COMMITS_DIR))
    for path in with_retries(lambda: list_folder(fs, root), f"cannot list {uri_for(fs, root)}"):
        name = posixpath.basename(path)
        if name.endswith(".parquet") or _is_temp_name(name):
            _remove_retried(fs, path)
    _remove_retried(fs, posixpath.join(root, META_DIR))


# --- storage primitives -----------------------------------------------------------------------


def _check_name(what: str, name: str) -> None:
    if not _SAFE_NAME.match(name):
        raise ValueError(
            f"{what} {name!r} is not a safe file name ([A-Za-z0-9._-], no leading . or _)"
        )


def _marker_path(root: str, unit_id: str) -> str:
    return posixpath.join(root, COMMITS_DIR, f"{unit_id}.json")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def _put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Writes a whole file so that readers see either nothing/the old file or all of the new one;
    retried per storage.RetryPolicy, then StorageError.

    Local: a hidden temp file in the same folder, fsync, os.replace. Object stores: one pipe_file,
    a single PUT or (s3fs, big files) a multipart upload that only appears once completed.
    """
    with_retries(lambda: _put_once(fs, path, data), f"cannot write {uri_for(fs, path)}")


def _put_once(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if not _is_local(fs):
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        fs.pipe_file(path, data, **({"chunksize": S3_PART_BYTES} if "s3" in protocols else {}))
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise
    # Make the rename durable before the caller writes anything that depends on it (the marker).
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


def _remove_if_empty(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Removes an empty local folder (object stores have no empty folders)."""
    if _is_local(fs):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _read_all(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[bytes]:
    """Whole files, in order; s3fs fetches them concurrently. (fs.cat would treat [ ] * ? in a
    path as a glob; cat_ranges takes paths literally.) Memory: the files' bytes at once."""
    return fs.cat_ranges(paths, None, None, on_error="raise") if paths else []


def _remove_retried(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """_remove, retried per storage.RetryPolicy, then StorageError."""
    with_retries(lambda: _remove(fs, path), f"cannot delete {uri_for(fs, path)}")


def _remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Deletes a file or a whole folder/prefix; nothing when it does not exist."""
    if _is_local(fs):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        return
    fs.invalidate_cache(path)
    objects = fs.find(path)  # the object itself, or every object under the prefix
    if any(_GLOB_CHARS.search(name) for name in objects):
        for name in objects:  # fs.rm would expand these names as glob patterns
            fs.rm_file(name)
    elif objects:
        fs.rm(objects)  # s3fs: bulk deletes of up to 1000 keys
