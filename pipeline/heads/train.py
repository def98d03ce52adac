"""`ast-label head train`: the whole flow, from your examples to a head folder.

read        EXAMPLES (label folders, or a manifest) -> which files carry which labels
                                                                         (examples.py)
check       every bad input refused before any work: fewer than two labels, a label with
            fewer files than the folds need, a file or key that does not exist, an output
            made by another model
embed       in this process, on Ray, or from an output's rows             (embeddings.py)
validate    k folds split by file; thresholds from the held-out scores    (classifier.py)
fit, save   the final head on every example, with its report and card     (head.py)
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ast_model.config import DEFAULT_MODEL
from pipeline.errors import UserError
from pipeline.heads.classifier import (
    FitSettings,
    HeldOut,
    LinearModel,
    cross_validate,
    fit,
    thresholds_of,
)
from pipeline.heads.embeddings import Examples, embed_in_process, embed_on_ray, read_from_output
from pipeline.heads.examples import (
    ExamplesError,
    ExampleSpec,
    check_audio,
    check_enough_files,
    read_examples,
)
from pipeline.heads.head import Head, save_head
from pipeline.heads.options import TrainConfig
from pipeline.heads.report import (
    CrossValidation,
    cross_validation_json,
    evaluate,
    format_report,
    model_card,
    threshold_rule,
)

if TYPE_CHECKING:  # the run's progress display; the run itself loads only when used
    from pipeline.labeling.run import RunProgress

FAILURES_KEPT = 100  # unreadable files named in config.json (all are printed)


@dataclass(frozen=True)
class TrainResult:
    head: Head  # as saved
    report: CrossValidation
    examples: Examples
    held_out: HeldOut
    model: LinearModel  # the final fit, as scikit-learn holds it
    table: str  # the printed report
    plot: Path | None = None


def train_head(
    config: TrainConfig,
    echo: Callable[[str], None] = print,
    progress: RunProgress | None = None,
) -> TrainResult:
    """Trains, cross-validates and saves a head. `echo` takes progress and notes (one line
    each); `progress` shows run's progress when the examples are labeled on Ray."""
    config.check()
    spec = read_examples(config.examples, exclude=(config.output,))
    if config.from_output:
        examples = _examples_from_output(config, spec)
    else:
        examples = _examples_from_audio(config, spec, echo, progress)
    for line in examples.notes:
        echo(line)
    for name, reason in examples.failures:
        echo(f"left out, cannot be read: {name}: {reason}")
    if not examples.files:
        raise ExamplesError(
            f"no example is left of {config.examples}: every file failed (reasons above)"
        )
    multi_label = config.multi_label or bool((examples.targets.sum(axis=1) > 1).any())
    check_enough_files(examples.files_per_label(), len(examples.files), config.folds, multi_label)
    head, report, held_out, model = _train(config, spec, examples, multi_label, echo)
    saved = save_head(head, config.output, model_card(head, report, examples))
    table = format_report(report, examples, config.output)
    plot = None
    if config.plot is not None:
        from pipeline.heads.plot import write_plot

        plot = write_plot(config.plot, report, held_out, examples.targets, table)
    return TrainResult(saved, report, examples, held_out, model, table, plot)


def _train(
    config: TrainConfig,
    spec: ExampleSpec,
    examples: Examples,
    multi_label: bool,
    echo: Callable[[str], None],
) -> tuple[Head, CrossValidation, HeldOut, LinearModel]:
    """Cross-validation, thresholds from its held-out scores, and the final fit on every
    example, folded into the head."""
    settings = FitSettings(multi_label, config.c)
    echo(
        f"cross-validating: {len(examples.files)} files, {len(examples.targets)} windows, "
        f"{config.folds} folds split by file"
    )
    held_out = cross_validate(
        examples.embeddings,
        examples.targets,
        examples.file_of,
        settings,
        config.folds,
        config.seed,
        echo,
    )
    thresholds = thresholds_of(held_out.scores, examples.targets, config.target_precision)
    report = evaluate(examples, held_out, thresholds, config.target_precision, multi_label)
    model = fit(examples.embeddings, examples.targets, settings)
    weight, bias = model.weight_and_bias()  # (H, D), (H,) on the raw embedding
    head = Head(
        label_names=examples.label_names,
        thresholds=np.array([threshold.value for threshold in thresholds], dtype=np.float32),
        multi_label=multi_label,
        weight=weight.astype(np.float32),
        bias=bias.astype(np.float32),
        base_model=examples.base_model,
        details={
            "training": _training_json(config, spec, examples, multi_label, model.converged),
            "cross_validation": cross_validation_json(report),
        },
    )
    return head, report, held_out, model


def _examples_from_output(config: TrainConfig, spec: ExampleSpec) -> Examples:
    """The example files' rows of --from-output, refused when another model made them."""
    from pipeline.output.reader import open_output

    output = open_output(str(config.from_output))
    made_by = str(output.metadata.get("weights_sha256", ""))
    if config.model is not None:
        from ast_model.checkpoint_files import read_checkpoint

        wanted = read_checkpoint(config.model).weights_sha256
        if wanted != made_by:
            raise ExamplesError(
                f"output {output.uri} was made by model {output.model} (weights "
                f"{made_by[:12]}), not by {config.model} (weights {wanted[:12]}): pass --model "
                f"{output.model}, or train from an output of {config.model}"
            )
    return read_from_output(spec, output)


def _examples_from_audio(
    config: TrainConfig,
    spec: ExampleSpec,
    echo: Callable[[str], None],
    progress: RunProgress | None,
) -> Examples:
    spec = check_audio(spec)  # every file and key exists; shards expanded to their members
    check_enough_files(spec.files_per_label(), len(spec.spans), config.folds, config.multi_label)
    options = replace(config.options, model=config.model or DEFAULT_MODEL)
    files = len(spec.spans)
    if files <= config.ray_above:
        echo(f"embedding {files} example files in this process (as `predict` does)")
        return embed_in_process(spec, options, echo)
    if config.address and not config.scratch:
        raise UserError(
            "--address: give --scratch URI, an output location that the cluster can write, "
            "for the examples' embeddings"
        )
    scratch = config.scratch or tempfile.mkdtemp(prefix="ast-label-head-")
    echo(
        f"embedding {files} example files on Ray (more than --ray-above {config.ray_above}): "
        f"`run` into {scratch}"
    )
    try:
        return embed_on_ray(spec, options, scratch, config.address, echo, progress)
    finally:
        if config.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)


def _training_json(
    config: TrainConfig,
    spec: ExampleSpec,
    examples: Examples,
    multi_label: bool,
    converged: bool,
) -> dict[str, Any]:
    """The "training" entry of the head's config.json."""
    import sklearn

    files, windows = examples.files_per_label(), examples.windows_per_label()
    return {
        "examples": {
            "source": spec.source,
            "location": config.examples,
            "from_output": config.from_output,
            "files": len(examples.files),
            "windows": int(len(examples.targets)),
            "per_label": {
                name: {"files": files[name], "windows": windows[name]}
                for name in examples.label_names
            },
            "windows_outside_spans": examples.windows_outside_spans,
            "files_left_out": len(examples.failures),
            "left_out": [
                {"file": name, "reason": reason}
                for name, reason in examples.failures[:FAILURES_KEPT]
            ],
        },
        "embeddings": examples.embedded_by,
        "window_s": examples.window_s,
        "hop_s": examples.hop_s,
        "classifier": {
            "library": f"scikit-learn {sklearn.__version__}",
            "model": "LogisticRegression",
            "solver": "lbfgs",
            "c": config.c,
            "class_weight": "balanced",
            "standardisation": "StandardScaler, folded into weight and bias",
            "converged": converged,
        },
        "multi_label": multi_label,
        "folds": config.folds,
        "seed": config.seed,
        "thresholds": f"{threshold_rule(config.target_precision)}, on the held-out scores of "
        "all folds",
    }
