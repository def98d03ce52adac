"""The labeling commands: `predict` (in this process), `run` (on Ray), `relabel` (a head over an
output), `demo`, `norm-stats`; the options `run` and `predict` share are written once here."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ast_model.config import DEFAULT_MODEL
from pipeline import defaults
from pipeline.cluster import prepare_token_auth
from pipeline.commands.cli_core import ADDRESS_HELP, MODEL_HELP, main, note, run_progress
from pipeline.errors import RunIncomplete, UserError, WorkFailed

DEMO_MODEL_NOTE = (
    "note: the bundled model is a demo model of 10 synthetic classes (tones, noises, clicks): "
    "use real weights (--model) for real audio"
)

# --- the options `run` and `predict` share: the same names, defaults and checks -----------------

_LABELING_OPTIONS = (
    click.argument("inputs", nargs=-1),
    click.option(
        "--manifest", help="File listing input URIs: text (one per line), CSV or Parquet."
    ),
    click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP),
    click.option(
        "--window-s",
        type=float,
        help="Window length in seconds [default: the model's input, 10.24].",
    ),
    click.option(
        "--hop-s", type=float, help="Hop between windows in seconds [default: the window length]."
    ),
    click.option(
        "--allow-gaps",
        is_flag=True,
        help="Accept a hop longer than the window (the audio between windows is not labeled).",
    ),
    click.option(
        "--top-k",
        "-k",
        default=defaults.TOP_K,
        show_default=True,
        type=int,
        help="Labels kept per window in top_labels/top_scores (every label's score is in scores).",
    ),
    click.option(
        "--batch-size",
        type=int,
        help=f"Windows per model batch [default: {defaults.GPU_BATCH_SIZE} on GPU, "
        f"{defaults.CPU_BATCH_SIZE} on CPU].",
    ),
    click.option(
        "--device",
        default=defaults.DEVICE,
        show_default=True,
        type=click.Choice(defaults.DEVICES),
        help="Where the model runs: auto takes a GPU when there is one.",
    ),
    click.option(
        "--precision",
        default=defaults.PRECISION,
        show_default=True,
        type=click.Choice(defaults.PRECISIONS),
        help="auto: bf16 autocast on GPU, fp32 on CPU.",
    ),
    click.option(
        "--max-duration-s",
        default=defaults.MAX_DURATION_S,
        show_default=True,
        type=float,
        help="Files longer than this become errors.",
    ),
    click.option(
        "--norm-stats", help="JSON from `ast-label norm-stats` to use instead of AudioSet's."
    ),
    click.option(
        "--head",
        metavar="HEAD",
        help="A head folder from `ast-label head train`: its labels (head_labels, head_scores) "
        "beside the model's.",
    ),
)


def _files_per_unit_option(text: str):
    return click.option(
        "--files-per-unit",
        default=defaults.FILES_PER_UNIT,
        show_default=True,
        type=click.IntRange(min=1),
        help=text,
    )


def _labeling_options(command):
    for option in reversed(_LABELING_OPTIONS):
        command = option(command)
    return command


# --- labeling ------------------------------------------------------------------------------------


@main.command("predict")
@_labeling_options
@click.option("--windows", is_flag=True, help="One line (or JSON object) per window, not per file.")
@click.option(
    "--json", "as_json", is_flag=True, help="JSON lines on stdout, failed files included."
)
@click.option("--scores", is_flag=True, help="With --json: every label's score.")
@click.option("--embedding", is_flag=True, help="With --json: the pooled embedding.")
def predict_command(inputs, windows, as_json, scores, embedding, **options) -> None:
    """Label INPUTS in this process, without Ray: the same inputs, windows and numbers as `run`.
    A file's labels are the top of the mean of its windows' scores."""
    if (scores or embedding) and not as_json:
        raise UserError("--scores and --embedding go with --json")
    from pipeline.commands.predict import PredictConfig, Predictor, text_line
    from pipeline.settings import LabelingOptions

    labeling = LabelingOptions.take(options)
    predictor = Predictor(PredictConfig(tuple(inputs), options.pop("manifest"), labeling))
    plan = predictor.plan()
    _note_if_demo_model(labeling.model)(None)
    if plan.skipped:
        note("skipped (not inputs): " + ", ".join(f"{n} {why}" for why, n in plan.skipped.items()))
    files = failed = 0
    for result in predictor.label(plan.units):
        files += 1
        failed += result.error is not None
        for record in predictor.records(result, windows, scores, embedding):
            if as_json:
                click.echo(json.dumps(record))
            else:
                click.echo(text_line(record), err=result.error is not None)
    if failed:
        raise WorkFailed(f"{failed} of {files} files could not be labeled")


@main.command("run")
@_labeling_options
@click.option("--output", "-o", required=True, help="Output folder or URI (s3://bucket/prefix).")
@click.option(
    "--classifier-actors",
    type=int,
    help="Model actors [default: one per GPU; on CPU one per "
    f"{defaults.CPUS_PER_CPU_CLASSIFIER} CPUs].",
)
@_files_per_unit_option("Plain audio files grouped per output file.")
@click.option(
    "--overwrite", is_flag=True, help="Delete this output's earlier results and start again."
)
@click.option("--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP)
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's own logs and progress bars.")
def run_command(inputs, **options) -> None:
    """Label INPUTS (tar shards, audio files, folders, globs, brace ranges, s3:// URIs) into
    Parquet under --output, exactly once per file. Run the same command again to resume, or to
    label what is new when the input has grown."""
    prepare_token_auth(options["address"])
    from pipeline.labeling.run import run_labeling
    from pipeline.settings import LabelingOptions, RunConfig

    config = RunConfig(tuple(inputs), options=LabelingOptions.take(options), **options)
    with run_progress() as progress:
        echo = _note_if_demo_model(config.options.model, progress.note)
        summary = run_labeling(config, echo=echo, progress=progress)
    _report(summary)


def _note_if_demo_model(model: str, echo=note):
    """`echo`, saying first (once the checks have passed, with the first line there is to say)
    that the bundled model is a demo's; `echo(None)` says only that."""
    said = model != DEFAULT_MODEL

    def echo_after_the_note(line: str | None) -> None:
        nonlocal said
        if not said:
            echo(DEMO_MODEL_NOTE)
            said = True
        if line is not None:
            echo(line)

    return echo_after_the_note


@main.command("relabel")
@click.argument("source", metavar="OUTPUT")
@click.option("--head", required=True, metavar="HEAD", help="The head folder to apply.")
@click.option("--output", "-o", required=True, help="The new output folder or URI.")
@click.option(
    "--overwrite", is_flag=True, help="Delete the new output's earlier results and start again."
)
@click.option("--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP)
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's own logs and progress bars.")
def relabel_command(source, **options) -> None:
    """Score an existing OUTPUT with a head into a new output, from its stored embeddings: no
    audio is read, no transformer runs. Every column is kept, the head's are added; rerun the same
    command to resume."""
    prepare_token_auth(options["address"])
    from pipeline.heads.relabel import RelabelConfig, relabel

    with run_progress() as progress:
        summary = relabel(RelabelConfig(source, **options), echo=progress.note, progress=progress)
    _report(summary)


def _report(summary) -> None:
    """A run's summary on stdout; RunIncomplete (exit 3) when units did not commit."""
    from pipeline.labeling.summary import format_summary

    click.echo(format_summary(summary))
    if not summary.complete:
        raise RunIncomplete(
            f"{len(summary.units_failed)} work units did not commit (storage faults, not the "
            "data's): run the same command again to label them"
        )


@main.command("demo")
@click.option(
    "--output",
    "-o",
    default="ast-label-demo",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for the generated corpus and its labels.",
)
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
def demo_command(output: Path, model: str) -> None:
    """Generate a small synthetic corpus, label it with the real pipeline on a Ray of this machine,
    and show what came out."""
    from pipeline.commands.demo import run_demo

    report = run_demo(output, model=model, echo=click.echo)
    if not report.summary.complete:
        raise RunIncomplete("the demo's output is incomplete: run the demo again")


@main.command("norm-stats")
@click.argument("inputs", nargs=-1)
@click.option("--output", "-o", required=True, help="Where to write the JSON: a path or s3:// URI.")
@click.option("--manifest", help="File listing input URIs: text (one per line), CSV or Parquet.")
@_files_per_unit_option("Plain audio files measured per task.")
@click.option(
    "--max-duration-s",
    default=defaults.MAX_DURATION_S,
    show_default=True,
    type=float,
    help="Files longer than this are left out (counted as errors).",
)
@click.option("--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP)
def norm_stats_command(inputs, output, manifest, files_per_unit, max_duration_s, address) -> None:
    """Measure the fbank mean and std of INPUTS (as `run` takes them) into a JSON file for
    `ast-label run --norm-stats`."""
    prepare_token_auth(address)
    from pipeline.commands.norm_stats import compute_norm_stats

    stats = compute_norm_stats(inputs, manifest, files_per_unit, max_duration_s, address, echo=note)
    stats.save(output)
    click.echo(
        f"mean {stats.mean:.6f} std {stats.std:.6f} over {stats.frames} frames of {stats.files} "
        f"files ({stats.errors} unreadable) -> {output}"
    )
