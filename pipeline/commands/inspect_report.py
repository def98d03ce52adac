"""`ast-label inspect`'s text and JSON: what an Inspection (inspection.py) says, for people and
for scripts."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Any

from pipeline.commands.inspection import Inspection
from pipeline.defaults import INSPECT_TOP
from pipeline.labeling.summary import plural


def clock(seconds: float) -> str:
    """12.3 -> "0:12.3"; 3725.0 -> "1:02:05.0"."""
    seconds = max(0.0, float(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 1:
        return f"{int(hours)}:{int(minutes):02d}:{secs:04.1f}"
    return f"{int(minutes)}:{secs:04.1f}"


def file_name(shard: str, key: str) -> str:
    """How a file is shown: its URI for plain files (the key), shard:key inside a tar."""
    if key.startswith("/") or "://" in key:
        return key
    return f"{posixpath.basename(shard)}:{key}"


def spans_text(spans: Sequence[dict], windows: int, hit_windows: int, shown: int = 3) -> str:
    if windows and hit_windows == windows:
        return "whole file" if windows == 1 else f"all {windows} windows"
    parts = [f"{clock(span['start_s'])}-{clock(span['end_s'])}" for span in spans[:shown]]
    if len(spans) > shown:
        parts.append(f"(+{len(spans) - shown} more)")
    return ", ".join(parts)


def format_inspection(inspection: Inspection, top: int = INSPECT_TOP) -> str:
    """The text `ast-label inspect` prints; `top` rows per table (0: all)."""
    output, counts = inspection.output, inspection.counts
    multi = output.metadata.get("multi_label")
    kind = "sigmoid" if multi else "softmax" if multi is not None else "?"
    lines = [
        f"{output.uri}: {plural(counts['unit_files'], 'unit file')}, model {output.model} "
        f"({len(output.label_names)} labels, {kind} scores)",
        f"files {counts['files']} ({counts['labeled_files']} labeled, "
        f"{counts['files_with_errors']} with errors), windows {counts['windows']}, "
        f"error rows {counts['error_rows']}, audio {counts['audio_hours']:.3f} h",
    ]
    if output.uncommitted:
        lines.append(
            f"  ({plural(output.uncommitted, 'unit file')} without a commit marker left out: a "
            "run is in progress or was stopped; `ast-label run` again finishes them)"
        )
    if inspection.error_reasons:
        lines += ["", "Error rows by reason:"]
        lines += _limited(
            [f"  {n:>7}  {reason}" for reason, n in inspection.error_reasons.items()], top
        )
        failed = inspection.failed_files().to_pylist()
        lines += ["", f"Files that could not be labeled ({len(failed)}):"]
        lines += _limited(
            [f"  {file_name(r['shard'], r['key'])}: {r['error']}" for r in failed], top
        )
    distribution = inspection.label_distribution()
    if distribution:
        width = max(len(name) for name, _ in distribution)
        labeled = max(1, counts["labeled_files"])
        lines += [
            "",
            "Files per top label (a file's top label: the highest mean over its windows):",
        ]
        lines += _limited(
            [f"  {name:<{width}}  {n:>7}  {n / labeled:6.1%}" for name, n in distribution],
            top,
        )
    heads = inspection.head_distribution()
    if inspection.space.head:
        head = output.metadata.get("head") or {}
        lines += [
            "",
            f"Files per head label (head {str(head.get('sha256', '?'))[:12]}: a file has a "
            "label when a window reaches its threshold):",
        ]
        width = max(len(name) for name in inspection.space.head)
        lines += _limited([f"  {name:<{width}}  {n:>7}" for name, n in heads], top) or [
            "  (no file reaches a head label's threshold)"
        ]
    if inspection.query is not None:
        lines += ["", *_format_matches(inspection, top)]
    return "\n".join(lines)


def _format_matches(inspection: Inspection, top: int) -> list[str]:
    query = inspection.query
    matches = inspection.matches()
    whose = "the head's label " if query.head else ""
    lines = [
        f"Files where {whose}{query.label!r} >= {query.min_score:g} in some window: "
        f"{matches.num_rows} of {inspection.counts['labeled_files']} labeled files"
    ]
    if not matches.num_rows:
        return lines
    shown = matches if top <= 0 else matches.slice(0, top)
    rows = shown.to_pylist()  # at most `top` rows
    names = [file_name(row["shard"], row["key"]) for row in rows]
    width = min(60, max(len("file"), *(len(name) for name in names)))
    lines.append(f"  {'max':>5}  {'windows':>9}  {'duration':>9}  {'file':<{width}}  where")
    for row, name in zip(rows, names, strict=True):
        if len(name) > width:
            name = "..." + name[-(width - 3) :]
        hits = f"{row['label_windows']}/{row['windows']}"
        where = spans_text(row["spans"], row["windows"], row["label_windows"])
        lines.append(
            f"  {row['label_max']:5.3f}  {hits:>9}  {clock(row['duration_s']):>9}  "
            f"{name:<{width}}  {where}"
        )
    if matches.num_rows > shown.num_rows:
        lines.append(f"  ... and {matches.num_rows - shown.num_rows} more (--top 0 shows all)")
    return lines


def _limited(lines: list[str], top: int) -> list[str]:
    if top <= 0 or len(lines) <= top:
        return lines
    return [*lines[:top], f"  ... and {len(lines) - top} more (--top 0 shows all)"]


def inspection_json(inspection: Inspection, top: int = INSPECT_TOP) -> dict[str, Any]:
    """What `ast-label inspect --json` prints; `top` matches (0: all)."""
    output = inspection.output
    report: dict[str, Any] = {
        "output": output.uri,
        "model": output.model,
        "weights_sha256": output.metadata.get("weights_sha256"),
        "labels": len(output.label_names),
        "uncommitted_unit_files": output.uncommitted,
        **inspection.counts,
        "audio_hours": round(inspection.counts["audio_hours"], 6),
        "error_reasons": inspection.error_reasons,
        "failed_files": inspection.failed_files().to_pylist(),
        "files_per_top_label": dict(inspection.label_distribution()),
    }
    if inspection.space.head:
        report["head"] = {
            **(output.metadata.get("head") or {}),
            "files_per_label": dict(inspection.head_distribution()),
        }
    if inspection.query is not None:
        matches = inspection.matches()
        shown = matches if top <= 0 else matches.slice(0, top)
        report["query"] = {
            "label": inspection.query.label,
            "head": inspection.query.head,
            "min_score": inspection.query.min_score,
            "files": matches.num_rows,
            "matches": [
                {**row, "label_max": round(row["label_max"], 6)} for row in shown.to_pylist()
            ],
        }
    return report
