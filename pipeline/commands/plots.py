"""Pictures of an inspected output (`ast-label inspect --plot FILE`): the label distribution and,
for long files, the timelines of their top labels over the windows.

matplotlib is an optional extra (`pip install 'ast-label[plot]'`); figures are drawn on a plain
`matplotlib.figure.Figure`, never through pyplot, so no GUI backend or global state is involved
(headless machines, threads). An .html report is one self-contained file: the tables and the
figure embedded as a PNG.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from pipeline.commands.inspect_report import clock, file_name, inspection_json, spans_text
from pipeline.commands.inspection import Inspection, Timeline
from pipeline.defaults import INSPECT_TOP
from pipeline.errors import UserError

IMAGE_FORMATS = (".png", ".svg", ".pdf")
REPORT_FORMATS = (".html",)
BARS_SHOWN = 20  # labels in the distribution chart
DPI = 110
WIDTH_IN = 10.0
BAR_HEIGHT_IN = 0.28
TIMELINE_HEIGHT_IN = 2.3
QUERY_COLOR = "C3"  # red: the --label's bar, line and spans
PALETTE = ("C0", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9")  # the other labels' lines
_FILE_TITLE_CHARS = 90


class PlotError(UserError):
    """--plot cannot be done: the plot extra is missing, or the file name is not one it writes."""


def check_plot_path(path: str | Path) -> None:
    """Raises PlotError unless `path` can be written: a known suffix, an existing folder, and
    matplotlib installed. Cheap: callers check before reading a whole output."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_FORMATS + REPORT_FORMATS:
        raise PlotError(
            f"--plot {path}: give a file name ending in "
            + ", ".join(IMAGE_FORMATS + REPORT_FORMATS)
        )
    if not path.parent.is_dir():
        raise PlotError(f"--plot {path}: the folder {path.parent} does not exist")
    _require_matplotlib()


def write_plot(inspection: Inspection, path: str | Path, top: int = INSPECT_TOP) -> Path:
    """Writes the figure (.png, .svg, .pdf) or an HTML report (.html) of the inspection."""
    path = Path(path)
    check_plot_path(path)
    figure = draw(inspection)
    if path.suffix.lower() in IMAGE_FORMATS:
        figure.savefig(path, dpi=DPI)
    else:
        image = io.BytesIO()
        figure.savefig(image, format="png", dpi=DPI)
        path.write_text(html_report(inspection, image.getvalue(), top), encoding="utf-8")
    return path


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError(
            "--plot needs matplotlib, in the plot extra: pip install 'ast-label[plot]'"
        ) from None


def draw(inspection: Inspection):
    """One figure: the files per top label, then one panel per kept timeline."""
    _require_matplotlib()
    from matplotlib.figure import Figure

    distribution = inspection.label_distribution()
    shown = distribution[:BARS_SHOWN]
    if inspection.query is not None:  # the asked-for label's bar, even when it is not a top one
        queried = [item for item in distribution[BARS_SHOWN:] if item[0] == inspection.query.label]
        shown += queried
    distribution = shown
    bars = max(1, len(distribution))
    heights = [BAR_HEIGHT_IN * bars + 0.9] + [TIMELINE_HEIGHT_IN] * len(inspection.timelines)
    figure = Figure(figsize=(WIDTH_IN, sum(heights)), layout="constrained")
    axes = figure.subplots(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    _draw_distribution(axes[0], inspection, distribution)
    colors = _label_colors(inspection)
    for ax, timeline in zip(axes[1:], inspection.timelines, strict=True):
        _draw_timeline(ax, timeline, inspection, colors)
    return figure


def _draw_distribution(ax, inspection: Inspection, distribution: list[tuple[str, int]]) -> None:
    from matplotlib.ticker import MaxNLocator

    labeled = inspection.counts["labeled_files"]
    total = len(inspection.label_distribution())
    shown = ""
    if total > BARS_SHOWN:
        shown = f", the top {BARS_SHOWN} of {total} labels"
        if len(distribution) > BARS_SHOWN:
            shown += f" and {distribution[-1][0]!r}"
    ax.set_title(f"Files per top label ({labeled} labeled files{shown})", loc="left", fontsize=11)
    if not distribution:
        ax.text(0.5, 0.5, "no labeled files", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    names = [name for name, _ in distribution]
    counts = np.array([count for _, count in distribution])
    positions = np.arange(len(names))
    query = inspection.query.label if inspection.query else None
    ax.barh(positions, counts, color=[QUERY_COLOR if name == query else "C0" for name in names])
    ax.set_yticks(positions, names, fontsize=9)
    ax.invert_yaxis()  # most files on top
    ax.set_xlabel("files")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for position, count in zip(positions, counts, strict=True):
        ax.text(count, position, f" {count}", va="center", fontsize=8)
    ax.set_xlim(0, counts.max() * 1.12)
    ax.spines[["top", "right"]].set_visible(False)


def _draw_timeline(ax, timeline: Timeline, inspection: Inspection, colors: dict) -> None:
    """Each window's score held over the window (a step from window start to the next start)."""
    unit, scale = ("min", 60.0) if timeline.duration_s > 300 else ("s", 1.0)
    edges = np.r_[timeline.start_s, timeline.end_s[-1:]] / scale  # (W + 1,)
    query = inspection.query
    for j, label in enumerate(timeline.labels):
        queried = query is not None and label == query.label
        ax.stairs(
            timeline.scores[:, j],
            edges,
            baseline=None,
            color=colors[label],
            linewidth=2.6 if queried else 1.4,
            label=label,
            zorder=3 if queried else 2,
        )
    if query is not None:
        ax.axhline(query.min_score, color="grey", linestyle="--", linewidth=0.8)
        column = timeline.labels.index(query.label)
        for start, end, score in zip(
            timeline.start_s, timeline.end_s, timeline.scores[:, column], strict=True
        ):
            if score >= query.min_score:
                ax.axvspan(start / scale, end / scale, color=QUERY_COLOR, alpha=0.08, lw=0)
    name = file_name(timeline.shard, timeline.key)
    if len(name) > _FILE_TITLE_CHARS:
        name = "..." + name[-(_FILE_TITLE_CHARS - 3) :]
    ax.set_title(
        f"{name}  ({clock(timeline.duration_s)}, {len(timeline.start_s)} windows)",
        loc="left",
        fontsize=10,
    )
    ax.set_xlim(0, timeline.duration_s / scale)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(f"time ({unit})")
    ax.set_ylabel("score")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)


def _label_colors(inspection: Inspection) -> dict[str, str]:
    """One colour per label across all panels; the queried label's stands out."""
    query = inspection.query.label if inspection.query is not None else None
    others = [label for timeline in inspection.timelines for label in timeline.labels]
    others = [label for label in dict.fromkeys(others) if label != query]
    colors = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(others)}
    if query is not None:
        colors[query] = QUERY_COLOR
    return colors


def html_report(inspection: Inspection, png: bytes, top: int = INSPECT_TOP) -> str:
    """A self-contained HTML page: counts, error reasons, label distribution, matches, figure."""
    report = inspection_json(inspection, top)
    e = html.escape
    counts = [
        ("unit files", report["unit_files"]),
        ("files", report["files"]),
        ("labeled files", report["labeled_files"]),
        ("files with errors", report["files_with_errors"]),
        ("windows", report["windows"]),
        ("error rows", report["error_rows"]),
        ("audio hours", f"{report['audio_hours']:.3f}"),
    ]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>ast-label inspect {e(report['output'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
        "td.n{text-align:right}</style></head><body>",
        f"<h1>{e(report['output'])}</h1>",
        f"<p>model <code>{e(report['model'])}</code>, {report['labels']} labels</p>",
        _table(["", ""], [(name, value) for name, value in counts]),
    ]
    if report["error_reasons"]:
        rows = list(report["error_reasons"].items())
        parts += ["<h2>Error rows by reason</h2>", _table(["reason", "rows"], _top(rows, top))]
    distribution = list(report["files_per_top_label"].items())
    parts += [
        "<h2>Files per top label</h2>",
        "<p>A file's top label: the highest mean score over its windows.</p>",
        _table(["label", "files"], _top(distribution, top)),
    ]
    if "query" in report:
        query = report["query"]
        parts.append(
            f"<h2>Files where {e(repr(query['label']))} &ge; {query['min_score']:g} "
            f"in some window: {query['files']}</h2>"
        )
        rows = [
            (
                f"{match['label_max']:.3f}",
                f"{match['label_windows']}/{match['windows']}",
                clock(match["duration_s"]),
                file_name(match["shard"], match["key"]),
                spans_text(match["spans"], match["windows"], match["label_windows"], shown=10),
            )
            for match in query["matches"]
        ]
        parts.append(_table(["max", "windows", "duration", "file", "where"], rows))
    encoded = base64.b64encode(png).decode()
    parts += [
        "<h2>Pictures</h2>",
        f"<img alt='label distribution and timelines' src='data:image/png;base64,{encoded}'>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _top(rows: list, top: int) -> list:
    return rows if top <= 0 else rows[:top]


def _table(header: list[str], rows: list[tuple]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(name))}</th>" for name in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='n'>{value}</td>" if isinstance(value, int) else f"<td>{e(str(value))}</td>"
            for value in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>" if any(header) else f"<table>{body}</table>"
