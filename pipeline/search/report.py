"""What `similar` and `near-duplicates` print: text for people, JSON and CSV for scripts."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np

from pipeline.commands.inspect_report import clock, file_name
from pipeline.labeling.summary import plural
from pipeline.search.duplicates import DUPLICATE_DEFINITION, DuplicateReport
from pipeline.search.similar import Match, SimilarResult

# Decimals of similarities in JSON and CSV: far below any difference that matters.
DECIMALS = 6
# Windows closer than this (s) belong to one span.
SPAN_GAP_S = 1e-6
SPANS_SHOWN = 3


def spans(start_s: np.ndarray, end_s: np.ndarray) -> list[tuple[float, float]]:
    """Windows (W,) merged where they touch or overlap, in start order."""
    merged: list[list[float]] = []
    for start, end in sorted(zip(start_s.tolist(), end_s.tolist(), strict=True)):
        if merged and start <= merged[-1][1] + SPAN_GAP_S:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def matching_spans(match: Match, min_similarity: float | None) -> list[tuple[float, float]]:
    hit = match.matching(min_similarity)
    return spans(match.start_s[hit], match.end_s[hit])


def _where(match: Match, min_similarity: float | None) -> str:
    best = f"{clock(match.start_s[match.best])}-{clock(match.end_s[match.best])}"
    windows = len(match.similarities)
    if windows == 1:
        return f"{best} (whole file)"
    hit = int(match.matching(min_similarity).sum())
    text = f"{best} ({hit}/{windows} windows match"
    others = [
        s
        for s in matching_spans(match, min_similarity)
        if not s[0] <= match.start_s[match.best] < s[1]
    ]
    if others:
        shown = ", ".join(f"{clock(a)}-{clock(b)}" for a, b in others[:SPANS_SHOWN])
        more = f" +{len(others) - SPANS_SHOWN}" if len(others) > SPANS_SHOWN else ""
        text += f": also {shown}{more}"
    return text + ")"


def _labels(match: Match) -> str:
    text = ", ".join(f"{name} {score:.3f}" for name, score in match.top_labels.items())
    if match.head_labels is not None:
        text += " | head: " + (", ".join(match.head_labels) or "(none)")
    return text


def format_similar(result: SimilarResult) -> str:
    query = result.query
    labels = ", ".join(f"{name} {score:.3f}" for name, score in query.labels.items())
    lines = [
        f"{result.output.uri}: the files most like {query.source} "
        f"[window {query.window_index}, {clock(query.start_s)}-{clock(query.end_s)}: {labels}]",
        "searched: " + searched_text(result.searched),
        *(f"note: {note}" for note in result.notes),
    ]
    if not result.matches:
        floor = (
            f" at or above {result.min_similarity:g}" if result.min_similarity is not None else ""
        )
        return "\n".join([*lines, f"no files{floor}"])
    lines.append(f"{'rank':>4}  {'cosine':>6}  file  [best window (windows that match)]  labels")
    for match in result.matches:
        lines.append(
            f"{match.rank:>4}  {match.similarity:6.3f}  {file_name(match.shard, match.key)}  "
            f"[{_where(match, result.min_similarity)}]  {_labels(match)}"
        )
    return "\n".join(lines)


def searched_text(searched: dict[str, int]) -> str:
    parts = []
    if "index_windows" in searched:
        parts.append(
            f"{searched['index_windows']:,} windows of {searched['index_units']:,} units "
            "with the index"
        )
    if "exact_windows" in searched:
        scope = "new " if parts else ""
        parts.append(
            f"{searched['exact_windows']:,} windows of {searched['exact_units']:,} {scope}units "
            "exactly"
        )
    return " + ".join(parts) or "nothing"


def similar_json(result: SimilarResult) -> dict[str, Any]:
    query = result.query
    return {
        "output": result.output.uri,
        "model": result.output.model,
        "query": {
            "source": query.source,
            "window_index": query.window_index,
            "start_s": query.start_s,
            "end_s": query.end_s,
            "windows": query.windows,
            "labels": query.labels,
        },
        "k": result.k,
        "min_similarity": result.min_similarity,
        "similarity": "cosine of the query window and the file's best window",
        "searched": result.searched,
        "notes": result.notes,
        "matches": [_match_json(match, result.min_similarity) for match in result.matches],
    }


def _match_json(match: Match, min_similarity: float | None) -> dict[str, Any]:
    record = {
        "rank": match.rank,
        "similarity": round(match.similarity, DECIMALS),
        "file": file_name(match.shard, match.key),
        "shard": match.shard,
        "key": match.key,
        "duration_s": match.duration_s,
        "best_window": {
            "window_index": int(match.window_index[match.best]),
            "start_s": float(match.start_s[match.best]),
            "end_s": float(match.end_s[match.best]),
        },
        "matching_spans": [
            {"start_s": start, "end_s": end} for start, end in matching_spans(match, min_similarity)
        ],
        "windows": [
            {
                "window_index": int(i),
                "start_s": float(a),
                "end_s": float(b),
                "similarity": round(float(s), DECIMALS),
            }
            for i, a, b, s in zip(
                match.window_index, match.start_s, match.end_s, match.similarities, strict=True
            )
        ],
        "top_labels": match.top_labels,
    }
    if match.head_labels is not None:
        record["head_labels"] = list(match.head_labels)
    return record


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue()


# --- near-duplicates ------------------------------------------------------------------------------

DUPLICATE_COLUMNS = [
    "group",
    "keep",
    "file",
    "shard",
    "key",
    "windows",
    "duration_s",
    "similarity",
]


def duplicate_rows(report: DuplicateReport) -> list[list[Any]]:
    """One row per file of a group (DUPLICATE_COLUMNS): keep is true for the first file of each
    group; a training script drops the rows where it is false."""
    return [
        [
            group.number,
            "true" if position == 0 else "false",
            file_name(item.shard, item.key),
            item.shard,
            item.key,
            item.windows,
            item.duration_s,
            round(item.similarity, DECIMALS),
        ]
        for group in report.groups
        for position, item in enumerate(group.files)
    ]


def duplicates_csv(report: DuplicateReport) -> str:
    return csv_text(DUPLICATE_COLUMNS, duplicate_rows(report))


def duplicates_json(report: DuplicateReport) -> dict[str, Any]:
    return {
        "output": report.output.uri,
        "min_similarity": report.min_similarity,
        "similarity": DUPLICATE_DEFINITION,
        "files": report.files,
        "groups": [
            {
                "group": group.number,
                "files": [
                    {
                        "keep": position == 0,
                        "file": file_name(item.shard, item.key),
                        "shard": item.shard,
                        "key": item.key,
                        "windows": item.windows,
                        "duration_s": item.duration_s,
                        "similarity": round(item.similarity, DECIMALS),
                    }
                    for position, item in enumerate(group.files)
                ],
            }
            for group in report.groups
        ],
        "duplicates": report.duplicates,
    }


def format_duplicates(report: DuplicateReport, top: int) -> str:
    lines = [
        f"{report.output.uri}: {report.files:,} files compared; {len(report.groups):,} groups "
        f"of near-duplicates at file similarity >= {report.min_similarity:g} "
        f"({report.duplicates:,} files to drop, keeping the first of each group)",
        f"file similarity: {DUPLICATE_DEFINITION}",
    ]
    shown = report.groups if top <= 0 else report.groups[:top]
    for group in shown:
        lines.append(f"group {group.number} ({len(group.files)} files):")
        for position, item in enumerate(group.files):
            mark = "keep" if position == 0 else "drop"
            lines.append(
                f"  {mark}  {item.similarity:.4f}  {file_name(item.shard, item.key)}  "
                f"({clock(item.duration_s)}, {plural(item.windows, 'window')})"
            )
    if len(shown) < len(report.groups):
        lines.append(f"... {len(report.groups) - len(shown)} more groups (--top 0: all, or --csv)")
    return "\n".join(lines)
