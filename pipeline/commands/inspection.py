"""`ast-label inspect`: one pass over an output's committed unit files -> one row per input file.

What is read: the committed unit files (pipeline.output.reader), only the columns needed (never
`embedding`), one unit file at a time on a few threads. A unit file holds every row of its input
files, so each is reduced to one row per input file on its own, with numpy over the whole file:

    rows of a unit (N windows and error rows)            (N,) columns, scores (N, C)
      -> input files, in (shard, key) order               (F,) windows, errors, duration,
                                                              top label of the mean score,
                                                              the queried label's max and spans

Local paths and s3:// (any fsspec URL) alike. Errors the user causes (no output there, not an
ast-label output, unknown label) are UserErrors of one line; a store that keeps failing after the
retries is a StorageError (exit 3: run the command again). inspect_report.py turns the result
into text and JSON, plots.py into pictures.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.defaults import INSPECT_MIN_SCORE
from pipeline.errors import UserError
from pipeline.output.layout import LABELS_TABLE_NAME
from pipeline.output.reader import CommittedOutput, open_output

# The columns a scan reads; `embedding` (the bulk of a file) never.
SCAN_COLUMNS = ("shard", "key", "start_s", "end_s", "duration_s", "error", "scores")
# Unit files read at once: enough to hide an object store's latency, few enough for memory
# (one unit's scores at a time per thread).
READ_THREADS = 8
# Long files (more than one window) whose timelines a scan keeps for the plots, and how many of
# each file's labels a timeline shows.
TIMELINE_FILES = 6
TIMELINE_LABELS = 4
# Two windows of a file closer than this (s) belong to one span of a label query.
SPAN_GAP_S = 1e-6
_CLOSE_MATCHES = 5
_LIST_ALL_LABELS_UP_TO = 12


class UnknownLabel(UserError):
    """A label that is not one of the output's label names; the message lists close matches."""


# --- labels ---------------------------------------------------------------------------------------


def resolve_label(label: str, label_names: Sequence[str]) -> int:
    """The 0-based index of `label` in the score vectors: the exact name, else the one name that
    matches it ignoring case. Raises UnknownLabel naming close matches."""
    if label in label_names:
        return list(label_names).index(label)
    folded = [i for i, name in enumerate(label_names) if name.casefold() == label.casefold()]
    if len(folded) == 1:
        return folded[0]
    if len(label_names) <= _LIST_ALL_LABELS_UP_TO:
        known = ", ".join(repr(name) for name in label_names)
        raise UnknownLabel(f"unknown label {label!r}: this output's labels are {known}")
    lowered = {name.casefold(): name for name in label_names}
    close = [name for name in label_names if label.casefold() in name.casefold()]
    close += [
        lowered[match]
        for match in difflib.get_close_matches(label.casefold(), list(lowered), n=_CLOSE_MATCHES)
        if lowered[match] not in close
    ]
    hint = (
        "close matches: " + ", ".join(repr(name) for name in close[:_CLOSE_MATCHES])
        if close
        else "no close match; all names are in " + LABELS_TABLE_NAME
    )
    raise UnknownLabel(
        f"unknown label {label!r}: not one of this output's {len(label_names)} labels ({hint})"
    )


def duckdb_label_query(output_uri: str, label: str, min_score: float) -> str:
    """The one-line DuckDB query of the files where `label` scores at least `min_score` in some
    window (the labels table gives the index; DuckDB lists are 1-based)."""
    out = output_uri.rstrip("/")
    quoted = label.replace("'", "''")
    return (
        "select shard, key, max(scores[l.index + 1]) as score "
        f"from read_parquet('{out}/*.parquet') join read_csv('{out}/{LABELS_TABLE_NAME}') l "
        f"on l.name = '{quoted}' group by shard, key having score >= {min_score} "
        "order by score desc"
    )


# --- one pass over the output ---------------------------------------------------------------------


@dataclass(frozen=True)
class LabelQuery:
    label: str  # the label name as the output spells it
    index: int  # 0-based in the score vectors
    min_score: float


@dataclass(frozen=True)
class Timeline:
    """One long file's scores over its windows, for its top labels (and the queried one)."""

    shard: str
    key: str
    duration_s: float
    start_s: np.ndarray  # (W,)
    end_s: np.ndarray  # (W,)
    labels: tuple[str, ...]  # (L,)
    scores: np.ndarray  # (W, L)
    rank: tuple[float, float] = (0.0, 0.0)  # higher first: which files the plots show


@dataclass
class Inspection:
    """What `ast-label inspect` shows: one row per input file, and the figures made from it."""

    output: CommittedOutput
    # One row per input file: shard, key, windows, error_rows, duration_s, top_label (index into
    # label names, -1 for a file with no labeled window), top_score (mean over its windows);
    # with a query also label_max, label_windows (windows >= min_score), spans (merged windows).
    files: pa.Table
    error_reasons: dict[str, int]
    query: LabelQuery | None = None
    timelines: list[Timeline] = field(default_factory=list)

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.output.label_names

    @property
    def counts(self) -> dict[str, Any]:
        windows = np.asarray(self.files["windows"])
        errors = np.asarray(self.files["error_rows"])
        duration = np.asarray(self.files["duration_s"])
        return {
            "unit_files": len(self.output.files),
            "files": self.files.num_rows,
            "labeled_files": int(np.count_nonzero(windows)),
            "files_with_errors": int(np.count_nonzero(errors)),
            "windows": int(windows.sum()),
            "error_rows": int(errors.sum()),
            "audio_hours": float(duration[windows > 0].sum() / 3600.0),
        }

    def label_distribution(self) -> list[tuple[str, int]]:
        """(label, files whose top label it is), most files first; labels of no file left out."""
        top = np.asarray(self.files["top_label"])
        counts = np.bincount(top[top >= 0], minlength=len(self.label_names))
        order = np.lexsort((np.arange(len(counts)), -counts))
        return [(self.label_names[i], int(counts[i])) for i in order if counts[i]]

    def matches(self) -> pa.Table:
        """The files where the queried label scores at least min_score in some window, best
        first: shard, key, duration_s, windows, label_max, label_windows, spans."""
        if self.query is None:
            raise ValueError("no label query")
        found = self.files.filter(pc.greater_equal(self.files["label_max"], self.query.min_score))
        found = found.select(
            ["shard", "key", "duration_s", "windows", "label_max", "label_windows", "spans"]
        )
        order = pc.sort_indices(
            found,
            sort_keys=[("label_max", "descending"), ("shard", "ascending"), ("key", "ascending")],
        )
        return found.take(order)


def inspect_output(
    output_uri: str,
    label: str | None = None,
    min_score: float = INSPECT_MIN_SCORE,
    timelines: int = 0,
) -> Inspection:
    """Reads the output once: counts, the file-level top labels, and with `label` the files where
    it scores >= min_score (max over a file's windows) with the spans where it does; `timelines`
    long files are kept for plots (the best matches with a label, else the longest files)."""
    if not 0.0 <= min_score <= 1.0:
        raise UserError(f"--min-score {min_score} is not a score: give a number from 0 to 1")
    output = open_output(output_uri)
    query = None
    if label is not None:
        index = resolve_label(label, output.label_names)
        query = LabelQuery(output.label_names[index], index, min_score)
    dataset = output.dataset()
    fragments = list(dataset.get_fragments())
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(fragments))) as pool:
        scans = list(
            pool.map(lambda fragment: _scan_unit(fragment, output, query, timelines), fragments)
        )
    reasons: Counter[str] = Counter()
    kept: list[Timeline] = []
    for scan in scans:
        reasons.update(scan.error_reasons)
        kept = sorted([*kept, *scan.timelines], key=lambda t: t.rank, reverse=True)[:timelines]
    files = pa.concat_tables([scan.files for scan in scans]).combine_chunks()
    return Inspection(output, files, dict(reasons.most_common()), query, kept)


def files_with_label(output_uri: str, label: str, min_score: float = INSPECT_MIN_SCORE) -> pa.Table:
    """The files of an output where `label` scores at least `min_score` in some window, best
    first: shard, key, duration_s, windows, label_max, label_windows, spans (start_s, end_s of
    the merged windows at or above min_score). `.to_pandas()` for a DataFrame."""
    return inspect_output(output_uri, label, min_score).matches()


@dataclass
class UnitScan:
    """One unit file, reduced: one row per input file (see Inspection.files) and the rest."""

    files: pa.Table
    error_reasons: dict[str, int]
    timelines: list[Timeline]


def _scan_unit(
    fragment: pads.ParquetFileFragment,
    output: CommittedOutput,
    query: LabelQuery | None,
    timelines: int,
) -> UnitScan:
    table = output.read_unit_file(
        lambda: fragment.to_table(columns=list(SCAN_COLUMNS)), fragment.path
    )
    return reduce_unit(table, output.label_names, query, timelines)


def reduce_unit(
    table: pa.Table,
    label_names: Sequence[str],
    query: LabelQuery | None = None,
    timelines: int = 0,
) -> UnitScan:
    """One unit file's rows -> one row per input file (see Inspection.files). Pure numpy over the
    whole unit: no Python per row."""
    num_labels = len(label_names)
    ok = np.asarray(pc.is_null(table["error"]))  # (N,) labeled windows
    files = _FileGroups.of(table)
    ok_count = files.reduce(ok.astype(np.int64))  # (F,)
    error_rows = files.reduce((~ok).astype(np.int64))
    duration = np.where(ok, _floats(table["duration_s"]), np.nan)
    duration_per_file = np.nan_to_num(files.reduce(duration, np.fmax), nan=0.0)

    scores = _score_matrix(table["scores"], num_labels)  # (N, C), writable
    scores[~ok] = 0.0  # error rows' slots hold anything
    mean = files.reduce(scores) / np.maximum(ok_count, 1)[:, None]  # (F, C)
    top_label = np.where(ok_count > 0, mean.argmax(axis=1) if num_labels else -1, -1)
    top_score = np.where(top_label >= 0, mean.max(axis=1) if num_labels else 0.0, np.nan)

    firsts = pa.array(files.first_rows)
    columns: dict[str, pa.Array] = {
        "shard": table["shard"].take(firsts).combine_chunks(),
        "key": table["key"].take(firsts).combine_chunks(),
        "windows": pa.array(ok_count, pa.int64()),
        "error_rows": pa.array(error_rows, pa.int64()),
        "duration_s": pa.array(duration_per_file, pa.float64()),
        "top_label": pa.array(top_label, pa.int32()),
        "top_score": pa.array(top_score, pa.float32(), from_pandas=True),
    }
    start_s = _floats(table["start_s"])
    end_s = _floats(table["end_s"])
    if query is not None:
        label_score = np.where(ok, scores[:, query.index], np.nan)  # (N,)
        hit = ok & (label_score >= query.min_score)
        columns["label_max"] = pa.array(
            files.reduce(label_score, np.fmax), pa.float32(), from_pandas=True
        )
        columns["label_windows"] = pa.array(files.reduce(hit.astype(np.int64)), pa.int64())
        columns["spans"] = _spans(files, hit, start_s, end_s)

    reasons = pc.value_counts(table["error"].drop_null()).to_pylist() if table.num_rows else []
    error_reasons = {item["values"]: item["counts"] for item in reasons}
    per_file = pa.table(columns)
    kept = []
    if timelines:
        kept = _timelines(
            per_file, files, scores, start_s, end_s, ok, label_names, query, timelines
        )
    return UnitScan(per_file, error_reasons, kept)


@dataclass(frozen=True)
class _FileGroups:
    """A unit's rows grouped by input file, files in (shard, key) order."""

    order: np.ndarray  # (N,) the rows in file order
    sorted_ids: np.ndarray  # (N,) the file id of each row of `order`
    starts: np.ndarray  # (F,) each file's first position in `order`
    first_rows: np.ndarray  # (F,) each file's first row
    in_order: bool  # whether the rows are in file order already (order is then 0..N-1)

    @classmethod
    def of(cls, table: pa.Table) -> _FileGroups:
        file_of_row, first_rows = _file_ids(table["shard"], table["key"])  # (N,), (F,)
        # The writer sorts a unit by key, window: then the rows are in file order already and
        # the (N, C) scores need no reordering copy.
        in_order = bool(np.all(file_of_row[1:] >= file_of_row[:-1]))
        order = np.arange(len(file_of_row)) if in_order else np.argsort(file_of_row, kind="stable")
        sorted_ids = file_of_row[order]
        new_file = np.r_[True, sorted_ids[1:] != sorted_ids[:-1]] if len(order) else []
        starts = np.asarray(np.flatnonzero(new_file), dtype=np.int64)
        return cls(order, sorted_ids, starts, first_rows, in_order)

    def reduce(self, values: np.ndarray, ufunc: np.ufunc = np.add) -> np.ndarray:
        """(N, ...) per row -> (F, ...) per file, by `ufunc` over each file's rows."""
        if not len(self.order):
            return values[:0]
        return ufunc.reduceat(values if self.in_order else values[self.order], self.starts, axis=0)


def _file_ids(shard: pa.ChunkedArray, key: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(file id of each row, row index of each file's first row); ids follow (shard, key) order."""
    if len(key) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    shard_codes = _sorted_codes(shard)
    key_codes = _sorted_codes(key)
    combined = shard_codes * (int(key_codes.max()) + 1) + key_codes
    _, first_rows, file_of_row = np.unique(combined, return_index=True, return_inverse=True)
    return file_of_row.reshape(-1), first_rows


def _sorted_codes(column: pa.ChunkedArray) -> np.ndarray:
    """Integer codes of a string column that sort as the strings do (null first)."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    dictionary = encoded.dictionary
    rank = np.empty(len(dictionary), dtype=np.int64)
    rank[np.asarray(pc.sort_indices(dictionary))] = np.arange(len(dictionary))
    indices = encoded.indices.fill_null(-1).to_numpy()
    return np.where(indices >= 0, rank[np.maximum(indices, 0)] + 1, 0)


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    return column.combine_chunks().to_numpy(zero_copy_only=False).astype(np.float64)


def _score_matrix(column: pa.ChunkedArray, num_labels: int) -> np.ndarray:
    """A fixed_size_list<float32>[C] column -> (N, C) float32 that the caller may write to; null
    rows hold whatever their slots hold (the caller masks them)."""
    scores = column.combine_chunks()
    if isinstance(scores, pa.ChunkedArray):  # an empty column stays chunked
        return np.zeros((0, num_labels), np.float32)
    # .values ignores a slice's offset: take the child range of exactly these rows.
    flat = scores.values.slice(scores.offset * num_labels, len(scores) * num_labels)
    values = flat.to_numpy(zero_copy_only=False)
    if values.dtype != np.float32 or not values.flags.writeable:
        values = values.astype(np.float32)  # a copy the caller may write to
    return values.reshape(len(scores), num_labels)  # (N, C)


def _spans(files: _FileGroups, hit: np.ndarray, start_s: np.ndarray, end_s: np.ndarray) -> pa.Array:
    """list<struct<start_s, end_s>> per file: its windows at or above the threshold, merged where
    they touch or overlap (in start order)."""
    span_type = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64())])
    num_files = len(files.starts)
    hit_sorted = hit[files.order]
    hit_rows = files.order[hit_sorted]  # (H,) rows at or above the threshold, grouped by file
    file_ids = files.sorted_ids[hit_sorted]  # (H,) their file ids, non-decreasing
    by_start = np.lexsort((start_s[hit_rows], file_ids))
    hit_rows, file_ids = hit_rows[by_start], file_ids[by_start]
    starts, ends = start_s[hit_rows], end_s[hit_rows]
    running_end = _running_max_per_group(ends, file_ids)
    new_span = np.ones(len(hit_rows), dtype=bool)
    if len(hit_rows) > 1:
        same_file = file_ids[1:] == file_ids[:-1]
        touches = starts[1:] <= running_end[:-1] + SPAN_GAP_S
        new_span[1:] = ~(same_file & touches)
    span_first = np.flatnonzero(new_span)
    span_start = starts[span_first]
    span_end = np.maximum.reduceat(ends, span_first) if len(span_first) else ends[:0]
    span_file = file_ids[span_first]
    offsets = np.zeros(num_files + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(np.bincount(span_file, minlength=num_files))
    values = pa.StructArray.from_arrays(
        [pa.array(span_start, pa.float64()), pa.array(span_end, pa.float64())],
        fields=list(span_type),
    )
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _running_max_per_group(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Cumulative max of values within each run of equal (sorted) groups."""
    if len(values) == 0:
        return values
    # Shift each group above every earlier one, so one global running max restarts per group.
    span = float(np.max(values) - np.min(values)) + 1.0
    lifted = values + groups * span
    return np.maximum.accumulate(lifted) - groups * span


def _timelines(
    per_file: pa.Table,
    files: _FileGroups,
    scores: np.ndarray,
    start_s: np.ndarray,
    end_s: np.ndarray,
    ok: np.ndarray,
    label_names: Sequence[str],
    query: LabelQuery | None,
    count: int,
) -> list[Timeline]:
    """The unit's best `count` long files (more than one window) as timelines: the best matches
    of the query, else the longest files."""
    windows = np.asarray(per_file["windows"])
    duration = np.asarray(per_file["duration_s"])
    if query is not None:
        primary = np.nan_to_num(np.asarray(per_file["label_max"], dtype=np.float64), nan=-1.0)
        primary = np.where(primary >= query.min_score, primary, -1.0)
    else:
        primary = np.zeros(len(windows))
    candidates = np.flatnonzero((windows > 1) & (primary >= 0))
    candidates = candidates[np.lexsort((-duration[candidates], -primary[candidates]))][:count]
    ends = np.r_[files.starts[1:], len(files.order)]
    kept = []
    for file in candidates:  # at most `count` files per unit
        rows = files.order[files.starts[file] : ends[file]]
        rows = rows[ok[rows]]
        rows = rows[np.argsort(start_s[rows], kind="stable")]
        file_scores = scores[rows]  # (W, C)
        best = list(np.argsort(-file_scores.max(axis=0), kind="stable")[:TIMELINE_LABELS])
        if query is not None and query.index not in best:
            best = [query.index, *best[: TIMELINE_LABELS - 1]]
        kept.append(
            Timeline(
                shard=per_file["shard"][int(file)].as_py(),
                key=per_file["key"][int(file)].as_py(),
                duration_s=float(duration[file]),
                start_s=start_s[rows],
                end_s=end_s[rows],
                labels=tuple(label_names[i] for i in best),
                scores=file_scores[:, best],
                rank=(float(primary[file]), float(duration[file])),
            )
        )
    return kept
