"""What cross-validation says of a head: figures per label, the table `head train` prints, the
JSON kept in the head's config.json, and its model card (README.md).

Every figure is measured on held-out windows (scored by a model that never saw their file).
Precision, recall and F1 are those of the head's own labels (score >= threshold), each fold at
thresholds chosen on the other folds only: choosing and grading a threshold on the same scores
would flatter it. Average precision needs no threshold; beside it, its chance level (the label's
share of windows), so a head that learned nothing reads as such.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix

from pipeline.heads.classifier import HeldOut, Threshold, nested_decisions
from pipeline.heads.embeddings import Examples
from pipeline.heads.head import Head

DECIMALS = 4  # in config.json: finer than any difference a few hundred examples can show


@dataclass(frozen=True)
class LabelFigures:
    label: str
    files: int
    windows: int
    precision: float
    recall: float
    f1: float
    average_precision: float
    chance_average_precision: float  # the label's share of windows: random scores' AP
    threshold: float  # the head's own, chosen on all held-out scores
    target_reached: bool  # False: no threshold reached --target-precision


@dataclass(frozen=True)
class CrossValidation:
    labels: tuple[LabelFigures, ...]
    multi_label: bool
    folds: int
    threshold_rule: str
    converged: bool
    # Single-label heads: the top score's label against the true one (threshold-free).
    accuracy: float | None = None
    chance_accuracy: float | None = None  # the largest label's share of windows
    confusion: np.ndarray | None = None  # (H, H) windows: rows true label, columns predicted

    def macro(self) -> dict[str, float]:
        names = ("precision", "recall", "f1", "average_precision", "chance_average_precision")
        return {name: float(np.mean([getattr(f, name) for f in self.labels])) for name in names}


def threshold_rule(target_precision: float | None) -> str:
    if target_precision is None:
        return "best F1"
    return f"lowest threshold reaching precision {target_precision:g}"


def evaluate(
    examples: Examples,
    held_out: HeldOut,
    thresholds: list[Threshold],
    target_precision: float | None,
    multi_label: bool,
) -> CrossValidation:
    targets = examples.targets  # (N, H) bool
    decisions = nested_decisions(held_out, targets, target_precision)  # (N, H) bool
    files, windows = examples.files_per_label(), examples.windows_per_label()
    figures = []
    for label, name in enumerate(examples.label_names):
        truth, taken = targets[:, label], decisions[:, label]
        hits = float((truth & taken).sum())
        precision = hits / max(1, int(taken.sum()))
        recall = hits / max(1, int(truth.sum()))
        figures.append(
            LabelFigures(
                label=name,
                files=files[name],
                windows=windows[name],
                precision=precision,
                recall=recall,
                f1=2 * precision * recall / max(precision + recall, 1e-12),
                average_precision=float(average_precision_score(truth, held_out.scores[:, label])),
                chance_average_precision=float(truth.mean()),
                threshold=thresholds[label].value,
                target_reached=thresholds[label].reached,
            )
        )
    report = CrossValidation(
        tuple(figures),
        multi_label,
        held_out.folds,
        threshold_rule(target_precision),
        held_out.converged,
    )
    if multi_label:
        return report
    truth, predicted = targets.argmax(axis=1), held_out.scores.argmax(axis=1)
    labels = range(len(examples.label_names))
    return replace(
        report,
        accuracy=float((truth == predicted).mean()),
        chance_accuracy=float(targets.mean(axis=0).max()),
        confusion=confusion_matrix(truth, predicted, labels=list(labels)),
    )


def cross_validation_json(report: CrossValidation) -> dict[str, Any]:
    """The "cross_validation" entry of the head's config.json."""
    result: dict[str, Any] = {
        "folds": report.folds,
        "split": "by file: all windows of a file in the same fold",
        "scored": "windows, each by a model trained without its file",
        "thresholds": f"{report.threshold_rule}, chosen on the other folds' held-out scores",
        "labels": {
            figures.label: _rounded({k: v for k, v in asdict(figures).items() if k != "label"})
            for figures in report.labels
        },
        "macro": _rounded(report.macro()),
        "converged": report.converged,
    }
    if report.accuracy is not None:
        result["accuracy"] = round(report.accuracy, DECIMALS)
        result["chance_accuracy"] = round(float(report.chance_accuracy), DECIMALS)
        result["confusion_matrix"] = {
            "rows": "true label",
            "columns": "predicted label (the top score)",
            "counts": np.asarray(report.confusion).tolist(),
        }
    return result


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, DECIMALS) if isinstance(v, float) else v for k, v in values.items()}


def format_report(report: CrossValidation, examples: Examples, head_folder: str) -> str:
    """The table `head train` prints."""
    kind = "multi-label (sigmoid)" if report.multi_label else "single-label (softmax)"
    width = max(5, *(len(figures.label) for figures in report.labels))
    header = (
        f"{'label':<{width}}  files  windows  precision  recall     F1     AP  chance AP  threshold"
    )
    lines = [
        f"head: {len(report.labels)} labels, {kind}, from {len(examples.files)} files "
        f"({len(examples.targets)} windows) -> {head_folder}",
        f"cross-validation: {report.folds} folds split by file, every window scored by a model "
        "that never saw its file;",
        f"precision/recall/F1 of the head's labels at thresholds ({report.threshold_rule}) "
        "chosen on the other folds",
        header,
    ]
    for f in report.labels:
        mark = "" if f.target_reached else "  (target not reached)"
        lines.append(
            f"{f.label:<{width}}  {f.files:>5}  {f.windows:>7}  {f.precision:>9.3f}  "
            f"{f.recall:>6.3f}  {f.f1:>5.3f}  {f.average_precision:>5.3f}  "
            f"{f.chance_average_precision:>9.3f}  {f.threshold:>9.3f}{mark}"
        )
    macro = report.macro()
    lines.append(
        f"{'macro':<{width}}  {'':>5}  {'':>7}  {macro['precision']:>9.3f}  "
        f"{macro['recall']:>6.3f}  {macro['f1']:>5.3f}  {macro['average_precision']:>5.3f}  "
        f"{macro['chance_average_precision']:>9.3f}"
    )
    if report.accuracy is not None:
        lines.append(
            f"accuracy (top score's label) {report.accuracy:.3f}, chance "
            f"{report.chance_accuracy:.3f}"
        )
        lines += _confusion_lines(report)
    if not report.converged:
        lines.append("note: the solver did not converge in every fit; try a smaller --c")
    return "\n".join(lines)


def _confusion_lines(report: CrossValidation) -> list[str]:
    counts = np.asarray(report.confusion)
    names = [figures.label for figures in report.labels]
    width = max(len(str(counts.max())), len(str(len(names) - 1)) + 2, 4)
    numbered = [f"[{index}] {name}" for index, name in enumerate(names)]
    label_width = max(len(text) for text in numbered)
    lines = ["confusion (windows; rows: true label, columns: predicted)"]
    lines.append(" " * label_width + "".join(f"{f'[{i}]':>{width + 1}}" for i in range(len(names))))
    for text, row in zip(numbered, counts, strict=True):
        lines.append(f"{text:<{label_width}}" + "".join(f"{int(n):>{width + 1}}" for n in row))
    return lines


# The head's README.md; model_card fills it in. The snippet under "Use" is run by the tests.
MODEL_CARD = """# ast-label head: {labels}

A linear classifier on the pooled embedding of `{base_name}` (weights sha256
`{base_sha256}`, {hidden_size}-dimensional): {num_labels} labels, {kind}. A window has a
label when its score reaches the label's threshold.

## Labels, thresholds and cross-validation

{folds}-fold cross-validation split by file: every window scored by a model that never saw its
file. Precision, recall and F1 are those of the head's labels at thresholds ({threshold_rule})
chosen on the other folds; AP is average precision, chance AP the label's share of windows (what
random scores reach).

| label | threshold | files | windows | precision | recall | F1 | AP | chance AP |
|---|---|---|---|---|---|---|---|---|
{rows}
{accuracy}
## Training

- examples: {files} files, {windows} windows of {window_s:g} s (hop {hop_s:g} s); embeddings from
  {embedded_by}; {left_out} unreadable files left out
- classifier: {library} LogisticRegression (L-BFGS, L2, C={c}, balanced class weights) on the
  standardised embedding; the standardisation is folded into the saved weight and bias
- the final head: trained on all examples; thresholds from the held-out scores of all folds

## Use

ast-label applies it to an output's stored embeddings. Without ast-label, numpy and safetensors
are all it takes (`embeddings`: (N, {hidden_size}) float32, the output's `embedding` column):

```python
import json, numpy as np
from safetensors.numpy import load_file
config, tensors = json.load(open("HEAD/config.json")), load_file("HEAD/head.safetensors")
logits = embeddings @ tensors["weight"].T + tensors["bias"]  # (N, H)
exp = np.exp(logits - logits.max(axis=1, keepdims=True))
scores = 1 / (1 + np.exp(-logits)) if config["multi_label"] else exp / exp.sum(1, keepdims=True)
labels = [[n for n, s, t in zip(config["label_names"], row, config["thresholds"]) if s >= t]
          for row in scores]
```

## Limits

The figures are held out, but come from the same collection as the examples: audio from other
sources, microphones or places can score lower. A head reads only the embeddings of the base
model above (ast-label refuses others).
"""


def model_card(head: Head, report: CrossValidation, examples: Examples) -> str:
    """The head's README.md."""
    classifier = head.details.get("training", {}).get("classifier", {})
    rows = "\n".join(
        f"| {f.label} | {f.threshold:.4f} | {f.files} | {f.windows} | {f.precision:.3f} | "
        f"{f.recall:.3f} | {f.f1:.3f} | {f.average_precision:.3f} | "
        f"{f.chance_average_precision:.3f} |"
        for f in report.labels
    )
    accuracy = ""
    if report.accuracy is not None:
        accuracy = (
            f"\nAccuracy of the top score's label: {report.accuracy:.3f} (chance "
            f"{report.chance_accuracy:.3f}).\n"
        )
    return MODEL_CARD.format(
        labels=", ".join(head.label_names),
        base_name=head.base_model.get("name", "?"),
        base_sha256=head.base_model.get("weights_sha256", "?"),
        hidden_size=head.hidden_size,
        num_labels=head.num_labels,
        kind="multi-label (sigmoid scores)"
        if head.multi_label
        else "single-label (softmax scores)",
        folds=report.folds,
        threshold_rule=report.threshold_rule,
        rows=rows,
        accuracy=accuracy,
        embedded_by=examples.embedded_by,
        files=len(examples.files),
        windows=len(examples.targets),
        window_s=examples.window_s,
        hop_s=examples.hop_s,
        left_out=len(examples.failures),
        library=classifier.get("library", "scikit-learn"),
        c=classifier.get("c", "?"),
    )
