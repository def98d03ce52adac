"""`ast-label inspect`: one pass over an output's committed unit files -> one row per input file.

What is read: the committed unit files (pipeline.output.reader), only the columns needed (never
`embedding`), one unit file at a time on a few threads. A unit file holds every row of its input
files, so each is reduced to one row per input file on its own (unit_reduction.py). A label
asked for may be the model's or, where the output has a head, the head's (the head's first when
both have the name).

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

from pipeline.commands.unit_reduction import (
    LabelQuery,
    LabelSpace,
    Timeline,
    UnitScan,
    reduce_unit,
)
from pipeline.defaults import INSPECT_MIN_SCORE
from pipeline.errors import UserError
from pipeline.output.layout import HEAD_LABELS_TABLE_NAME, LABELS_TABLE_NAME
from pipeline.output.reader import CommittedOutput, open_output

# The columns a scan reads (and a head's scores, where there is one); `embedding`, the bulk of a
# file, never.
SCAN_COLUMNS = ("shard", "key", "start_s", "end_s", "duration_s", "error", "scores")
# Unit files read at once: enough to hide an object store's latency, few enough for memory
# (one unit's scores at a time per thread).
READ_THREADS = 8
# Long files (more than one window) whose timelines a scan keeps for the plots.
TIMELINE_FILES = 6
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


def duckdb_label_query(output_uri: str, label: str, min_score: float, head: bool = False) -> str:
    """The one-line DuckDB query of the files where `label` (the model's, or with `head` the
    head's) scores at least `min_score` in some window (the labels table gives the index; DuckDB
    lists are 1-based)."""
    out = output_uri.rstrip("/")
    quoted = label.replace("'", "''")
    column, table = (
        ("head_scores", HEAD_LABELS_TABLE_NAME) if head else ("scores", LABELS_TABLE_NAME)
    )
    return (
        f"select shard, key, max({column}[l.index + 1]) as score "
        f"from read_parquet('{out}/*.parquet') join read_csv('{out}/{table}') l "
        f"on l.name = '{quoted}' group by shard, key having score >= {min_score} "
        "order by score desc"
    )


# --- one pass over the output ---------------------------------------------------------------------


@dataclass
class Inspection:
    """What `ast-label inspect` shows: one row per input file, and the figures made from it."""

    output: CommittedOutput
    space: LabelSpace
    # One row per input file: shard, key, windows, error_rows, error (its first error row's
    # reason), duration_s, top_label (index into the model's labels, -1 for a file with no
    # labeled window), top_score (mean over its windows); with a query also label_max,
    # label_windows (windows >= min_score), spans (merged windows).
    files: pa.Table
    error_reasons: dict[str, int]
    head_files: np.ndarray  # (H,) files with each head label in some window (at its threshold)
    query: LabelQuery | None = None
    timelines: list[Timeline] = field(default_factory=list)

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.space.base

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

    def head_distribution(self) -> list[tuple[str, int]]:
        """(head label, files where a window has it), most files first; none of no file."""
        counts = self.head_files
        order = np.lexsort((np.arange(len(counts)), -counts))
        return [(self.space.head[i], int(counts[i])) for i in order if counts[i]]

    def failed_files(self) -> pa.Table:
        """The files with an error row: shard, key, error (the reason), in (shard, key) order."""
        return self.files.filter(pc.greater(self.files["error_rows"], 0)).select(
            ["shard", "key", "error"]
        )

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
    min_score: float | None = None,
    timelines: int = 0,
) -> Inspection:
    """Reads the output once: counts, the file-level top labels, and with `label` the files where
    it scores >= min_score (max over a file's windows; None: a head label's threshold, else
    defaults.INSPECT_MIN_SCORE) with the spans where it does; `timelines` long files are kept for
    plots (the best matches with a label, else the longest files)."""
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise UserError(f"--min-score {min_score} is not a score: give a number from 0 to 1")
    output = open_output(output_uri)
    space = label_space(output)
    query = None if label is None else resolve_query(label, space, min_score)
    dataset = output.dataset()
    fragments = list(dataset.get_fragments())
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(fragments))) as pool:
        scans = list(
            pool.map(
                lambda fragment: _scan_unit(fragment, output, space, query, timelines), fragments
            )
        )
    reasons: Counter[str] = Counter()
    kept: list[Timeline] = []
    for scan in scans:
        reasons.update(scan.error_reasons)
        kept = sorted([*kept, *scan.timelines], key=lambda t: t.rank, reverse=True)[:timelines]
    files = pa.concat_tables([scan.files for scan in scans]).combine_chunks()
    head_files = np.sum([scan.head_files for scan in scans], axis=0, dtype=np.int64)
    return Inspection(output, space, files, dict(reasons.most_common()), head_files, query, kept)


def label_space(output: CommittedOutput) -> LabelSpace:
    """The model's labels, and its head's where the output has one."""
    head = output.metadata.get("head") or {}
    has_head = output.schema is not None and "head_scores" in output.schema.names
    if not has_head or not head.get("label_names"):
        return LabelSpace(output.label_names)
    return LabelSpace(
        output.label_names, tuple(head["label_names"]), tuple(head.get("thresholds", ()))
    )


def resolve_query(label: str, space: LabelSpace, min_score: float | None) -> LabelQuery:
    """`label` among the head's labels first, then the model's (UnknownLabel: neither). Without a
    min_score, a head's label is asked at its threshold, a model's at INSPECT_MIN_SCORE."""
    if space.head:
        try:
            index = resolve_label(label, space.head)
            score = space.head_thresholds[index] if min_score is None else min_score
            return LabelQuery(space.head[index], len(space.base) + index, score, head=True)
        except UnknownLabel:
            pass
    index = resolve_label(label, space.base)
    score = INSPECT_MIN_SCORE if min_score is None else min_score
    return LabelQuery(space.base[index], index, score)


def files_with_label(output_uri: str, label: str, min_score: float | None = None) -> pa.Table:
    """The files of an output where `label` scores at least `min_score` in some window, best
    first: shard, key, duration_s, windows, label_max, label_windows, spans (start_s, end_s of
    the merged windows at or above min_score). `.to_pandas()` for a DataFrame."""
    return inspect_output(output_uri, label, min_score).matches()


def _scan_unit(
    fragment: pads.ParquetFileFragment,
    output: CommittedOutput,
    space: LabelSpace,
    query: LabelQuery | None,
    timelines: int,
) -> UnitScan:
    columns = [*SCAN_COLUMNS, *(["head_scores"] if space.head else [])]
    table = output.read_unit_file(lambda: fragment.to_table(columns=columns), fragment.path)
    return reduce_unit(table, space, query, timelines)
