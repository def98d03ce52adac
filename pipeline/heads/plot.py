"""`head train --plot FILE`: the cross-validation drawn. Per label, the precision-recall curve
of its held-out scores with the head's threshold marked; for a single-label head, the confusion
matrix beside it. FILE.png (.svg, .pdf), or FILE.html: the table and the figure in one page.

Drawn on a plain matplotlib Figure, never pyplot (no GUI backend, no global state), as
pipeline/commands/plots.py does; its check_plot_path checks the name and the plot extra.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_curve

from pipeline.commands.plots import DPI, IMAGE_FORMATS, check_plot_path
from pipeline.heads.classifier import HeldOut
from pipeline.heads.report import CrossValidation

PANEL_IN = 4.6  # each panel's width and height, inches
MAX_MATRIX_LABELS = 30  # a bigger confusion matrix is unreadable: the table has it


def write_plot(
    path: str | Path, report: CrossValidation, held_out: HeldOut, targets: np.ndarray, table: str
) -> Path:
    """Writes the figure, or an HTML page with `table` (the printed report) and the figure."""
    path = Path(path)
    check_plot_path(path)
    figure = draw(report, held_out, targets)
    if path.suffix.lower() in IMAGE_FORMATS:
        figure.savefig(path, dpi=DPI)
        return path
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=DPI)
    encoded = base64.b64encode(image.getvalue()).decode()
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>ast-label head</title>"
        "<style>body{font-family:sans-serif;margin:2em}</style></head><body>"
        "<h1>Head: cross-validation</h1>"
        f"<pre>{html.escape(table)}</pre>"
        f"<img alt='precision-recall curves' src='data:image/png;base64,{encoded}'>"
        "</body></html>\n",
        encoding="utf-8",
    )
    return path


def draw(report: CrossValidation, held_out: HeldOut, targets: np.ndarray):
    """(N, H) held-out scores and bool targets -> one figure."""
    from matplotlib.figure import Figure

    matrix = report.confusion is not None and len(report.labels) <= MAX_MATRIX_LABELS
    panels = 2 if matrix else 1
    figure = Figure(figsize=(PANEL_IN * panels + 1.5, PANEL_IN), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    _draw_curves(axes[0], report, held_out, targets)
    if matrix:
        _draw_confusion(axes[1], report)
    return figure


def _draw_curves(ax, report: CrossValidation, held_out: HeldOut, targets: np.ndarray) -> None:
    for label, figures in enumerate(report.labels):
        truth, scores = targets[:, label], held_out.scores[:, label]
        precision, recall, _ = precision_recall_curve(truth, scores)
        color = f"C{label % 10}"
        ax.step(
            recall,
            precision,
            where="post",
            color=color,
            linewidth=1.4,
            label=f"{figures.label} (AP {figures.average_precision:.2f})",
        )
        taken = scores >= figures.threshold
        hits = (truth & taken).sum()
        # The head's threshold, placed on the held-out scores of all folds.
        ax.plot(hits / max(1, truth.sum()), hits / max(1, taken.sum()), "o", color=color)
    ax.set_title(
        f"Precision-recall, held out ({report.folds} folds by file)\ndots: the head's thresholds",
        loc="left",
        fontsize=10,
    )
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)


def _draw_confusion(ax, report: CrossValidation) -> None:
    counts = np.asarray(report.confusion, dtype=np.float64)  # (H, H)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # each true label's row
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    names = [figures.label for figures in report.labels]
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, [str(i) for i in ticks], fontsize=8)
    ax.set_yticks(ticks, [f"{name} [{i}]" for i, name in enumerate(names)], fontsize=8)
    if len(names) <= 12:
        for (row, column), count in np.ndenumerate(counts):
            color = "white" if shares[row, column] > 0.6 else "black"
            ax.text(column, row, int(count), ha="center", va="center", fontsize=8, color=color)
    ax.set_xlabel("predicted (top score)")
    ax.set_title(
        f"Confusion, held-out windows (accuracy {report.accuracy:.3f})", loc="left", fontsize=10
    )
