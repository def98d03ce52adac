"""One unit file of an output, reduced to one row per input file with numpy over the whole file.

    rows of a unit (N windows and error rows)            (N,) columns, scores (N, C + H)
      -> input files, in (shard, key) order               (F,) windows, errors, duration,
                                                              the first error, top label of the
                                                              mean score, the queried label's
                                                              max and spans, head labels seen

The label space is the model's labels and, when the output has a head, the head's after them
(`LabelSpace`): a query may be either. No Python per row: a 100k-row output takes about a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.output.reader import list_matrix

# Long files' timelines: how many of each file's labels one shows.
TIMELINE_LABELS = 4
# Two windows of a file closer than this (s) belong to one span of a label query.
SPAN_GAP_S = 1e-6


@dataclass(frozen=True)
class LabelSpace:
    """The labels an output scores: the model's (`scores`), then its head's (`head_scores`)."""

    base: tuple[str, ...]
    head: tuple[str, ...] = ()
    head_thresholds: tuple[float, ...] = ()

    def shown(self, index: int) -> str:
        """A label as tables and pictures name it: a head's label says so."""
        if index < len(self.base):
            return self.base[index]
        return f"{self.head[index - len(self.base)]} (head)"


@dataclass(frozen=True)
class LabelQuery:
    label: str  # the label name as the output spells it
    index: int  # 0-based in the label space (a head's labels after the model's)
    min_score: float
    head: bool = False  # one of the head's labels


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
class UnitScan:
    """One unit file, reduced: one row per input file (see inspection.Inspection.files), the
    error rows by reason, the files that have each head label, and timelines for the plots."""

    files: pa.Table
    error_reasons: dict[str, int]
    head_files: np.ndarray  # (H,) files with the head's label in some window
    timelines: list[Timeline]


def reduce_unit(
    table: pa.Table,
    space: LabelSpace,
    query: LabelQuery | None = None,
    timelines: int = 0,
) -> UnitScan:
    """One unit file's rows -> one row per input file. Pure numpy over the whole unit."""
    ok = np.asarray(pc.is_null(table["error"]))  # (N,) labeled windows
    files = _FileGroups.of(table)
    ok_count = files.reduce(ok.astype(np.int64))  # (F,)
    duration = np.where(ok, _floats(table["duration_s"]), np.nan)
    scores = _scores(table, space)  # (N, C + H), writable
    scores[~ok] = 0.0  # error rows' slots hold anything
    base = len(space.base)
    mean = files.reduce(scores[:, :base]) / np.maximum(ok_count, 1)[:, None]  # (F, C)
    top_label = np.where(ok_count > 0, mean.argmax(axis=1) if base else -1, -1)
    top_score = np.where(top_label >= 0, mean.max(axis=1) if base else 0.0, np.nan)

    firsts = pa.array(files.first_rows)
    columns: dict[str, pa.Array] = {
        "shard": table["shard"].take(firsts).combine_chunks(),
        "key": table["key"].take(firsts).combine_chunks(),
        "windows": pa.array(ok_count, pa.int64()),
        "error_rows": pa.array(files.reduce((~ok).astype(np.int64)), pa.int64()),
        "error": _first_errors(table["error"], ok, files),
        "duration_s": pa.array(np.nan_to_num(files.reduce(duration, np.fmax), nan=0.0)),
        "top_label": pa.array(top_label, pa.int32()),
        "top_score": pa.array(top_score, pa.float32(), from_pandas=True),
    }
    start_s, end_s = _floats(table["start_s"]), _floats(table["end_s"])
    if query is not None:
        label_score = np.where(ok, scores[:, query.index], np.nan)  # (N,)
        hit = ok & (label_score >= query.min_score)
        label_max = files.reduce(label_score, np.fmax)
        columns["label_max"] = pa.array(label_max, pa.float32(), from_pandas=True)
        columns["label_windows"] = pa.array(files.reduce(hit.astype(np.int64)), pa.int64())
        columns["spans"] = _spans(files, hit, start_s, end_s)
    head_hits = ok[:, None] & (scores[:, base:] >= np.asarray(space.head_thresholds))  # (N, H)
    head_files = (files.reduce(head_hits.astype(np.int64)) > 0).sum(axis=0)  # (H,)
    reasons = pc.value_counts(table["error"].drop_null()).to_pylist() if table.num_rows else []
    per_file = pa.table(columns)
    kept = []
    if timelines:
        kept = _timelines(per_file, files, scores, start_s, end_s, ok, space, query, timelines)
    error_reasons = {item["values"]: item["counts"] for item in reasons}
    return UnitScan(per_file, error_reasons, np.asarray(head_files, np.int64), kept)


def _scores(table: pa.Table, space: LabelSpace) -> np.ndarray:
    """(N, C + H) float32 that the caller may write to: the model's scores, then the head's."""
    base = _score_matrix(table["scores"], len(space.base))
    if not space.head:
        return base
    return np.concatenate([base, _score_matrix(table["head_scores"], len(space.head))], axis=1)


def _first_errors(error: pa.ChunkedArray, ok: np.ndarray, files: _FileGroups) -> pa.Array:
    """(F,) each file's error (its first error row's reason), null for a file without one."""
    reasons = error.combine_chunks().to_numpy(zero_copy_only=False)  # (N,) object
    failed = ~ok[files.order] if len(files.order) else np.zeros(0, bool)
    first: dict[int, str] = {}
    for position in np.flatnonzero(failed)[::-1]:  # the last write per file is its first row
        first[int(files.sorted_ids[position])] = reasons[files.order[position]]
    return pa.array([first.get(i) for i in range(len(files.starts))], pa.string())


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
    return np.array(list_matrix(column, num_labels))  # a copy: the view is read-only


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
    space: LabelSpace,
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
        file_scores = scores[rows]  # (W, C + H)
        base = file_scores[:, : len(space.base)]  # the model's labels show; the head's if asked
        best = list(np.argsort(-base.max(axis=0), kind="stable")[:TIMELINE_LABELS])
        if query is not None and query.index not in best:
            best = [query.index, *best[: TIMELINE_LABELS - 1]]
        kept.append(
            Timeline(
                shard=per_file["shard"][int(file)].as_py(),
                key=per_file["key"][int(file)].as_py(),
                duration_s=float(duration[file]),
                start_s=start_s[rows],
                end_s=end_s[rows],
                labels=tuple(space.shown(i) for i in best),
                scores=file_scores[:, best],
                rank=(float(primary[file]), float(duration[file])),
            )
        )
    return kept
