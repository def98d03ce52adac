"""The picture of `ast-label similar --plot FILE`: the ranking, and where in each file the match
lies (every window's similarity over the file's time, the best window shaded).

Drawn as inspect's plots are (pipeline.commands.plots): a plain matplotlib Figure, no pyplot;
matplotlib is the optional `plot` extra, checked before any work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.commands.inspect_report import clock, file_name
from pipeline.commands.plots import DPI, IMAGE_FORMATS, WIDTH_IN, PlotError, check_plot_path
from pipeline.search.similar import Match, SimilarResult

TIMELINES = 6  # files whose windows are drawn
BAR_HEIGHT_IN = 0.28
TIMELINE_HEIGHT_IN = 1.9
_NAME_CHARS = 60


def check_similar_plot(path: str | Path) -> None:
    """PlotError unless `path` is an image name (.png, .svg, .pdf) in an existing folder and
    matplotlib is installed."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_FORMATS:
        raise PlotError(f"--plot {path}: give a file name ending in " + ", ".join(IMAGE_FORMATS))
    check_plot_path(path)


def write_similar_plot(result: SimilarResult, path: str | Path) -> Path:
    path = Path(path)
    check_similar_plot(path)
    draw(result).savefig(path, dpi=DPI)
    return path


def draw(result: SimilarResult):
    from matplotlib.figure import Figure

    matches = result.matches
    shown = matches[:TIMELINES]
    heights = [BAR_HEIGHT_IN * max(1, len(matches)) + 1.0] + [TIMELINE_HEIGHT_IN] * len(shown)
    figure = Figure(figsize=(WIDTH_IN, sum(heights)), layout="constrained")
    axes = figure.subplots(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    _draw_ranking(axes[0], result)
    for ax, match in zip(axes[1:], shown, strict=True):
        _draw_windows(ax, match, result.min_similarity)
    return figure


def _short(name: str) -> str:
    return name if len(name) <= _NAME_CHARS else "..." + name[-(_NAME_CHARS - 3) :]


def _draw_ranking(ax, result: SimilarResult) -> None:
    query = result.query
    ax.set_title(
        f"Files most like {_short(query.source)} "
        f"({clock(query.start_s)}-{clock(query.end_s)}): cosine of the best window",
        loc="left",
        fontsize=11,
    )
    if not result.matches:
        ax.text(0.5, 0.5, "no files", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    names = [f"{m.rank}. {_short(file_name(m.shard, m.key))}" for m in result.matches]
    values = np.array([m.similarity for m in result.matches])
    positions = np.arange(len(names))
    ax.barh(positions, values, color="C0")
    ax.set_yticks(positions, names, fontsize=8)
    ax.invert_yaxis()  # the best on top
    low = min(0.0, float(values.min()))
    ax.set_xlim(low, 1.0)
    for position, value in zip(positions, values, strict=True):
        ax.text(value, position, f" {value:.3f}", va="center", fontsize=7)
    if result.min_similarity is not None:
        ax.axvline(result.min_similarity, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("cosine similarity")
    ax.spines[["top", "right"]].set_visible(False)


def _draw_windows(ax, match: Match, min_similarity: float | None) -> None:
    """Each window's similarity held over its span; the best window and the matching ones
    shaded."""
    order = np.argsort(match.start_s, kind="stable")
    starts, ends = match.start_s[order], match.end_s[order]
    values = match.similarities[order]
    edges = np.r_[starts, ends[-1:]]  # (W + 1,)
    ax.stairs(values, edges, baseline=None, color="C0", linewidth=1.6)
    hit = match.matching(min_similarity)[order]
    for start, end, matched in zip(starts, ends, hit, strict=True):
        if matched:
            ax.axvspan(start, end, color="C3", alpha=0.10, lw=0)
    best_start, best_end = match.start_s[match.best], match.end_s[match.best]
    ax.axvspan(best_start, best_end, color="C3", alpha=0.25, lw=0)
    if min_similarity is not None:
        ax.axhline(min_similarity, color="grey", linestyle="--", linewidth=0.8)
    ax.set_title(
        f"{match.rank}. {_short(file_name(match.shard, match.key))}  ({clock(match.duration_s)}, "
        f"best {match.similarity:.3f} at {clock(best_start)})",
        loc="left",
        fontsize=10,
    )
    ax.set_xlim(0, max(match.duration_s, float(ends[-1])))
    ax.set_ylim(min(0.0, float(values.min())) - 0.03, 1.03)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("cosine")
    ax.spines[["top", "right"]].set_visible(False)
