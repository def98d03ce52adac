"""The `ast-label` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ast_model.config import DEFAULT_MODEL
from pipeline.errors import UserError

# torch, Ray and the model code load inside the commands that need them: `ast-label submit`,
# `status` and `--help` answer in a fraction of a second.

MODEL_HELP = (
    "Hugging Face AST checkpoint: a folder or URI (s3://...) holding config.json and "
    "model.safetensors, a hub id, or an original AST .pth. Default: the bundled demo model."
)


def _user_errors() -> tuple[type[Exception], ...]:
    from ast_model.checkpoint import CheckpointError

    return (UserError, CheckpointError)


def _fail(error: Exception) -> click.ClickException:
    return click.ClickException(str(error))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ast-label")
def main() -> None:
    """Label audio corpora with the Audio Spectrogram Transformer (AST) on Ray."""


@main.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--top-k", "-k", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file on stdout.")
@click.option("--scores", is_flag=True, help="With --json: include every label's score.")
@click.option("--embedding", is_flag=True, help="With --json: include the pooled embedding.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
def predict(files, model, top_k, as_json, scores, embedding, device) -> None:
    """Label a few FILES in this process (no Ray). Long files are cut into windows whose scores
    are averaged."""
    from ast_model.checkpoint import CheckpointError, load_checkpoint
    from pipeline.audio import AudioError
    from pipeline.predict import FilePredictor

    try:
        predictor = FilePredictor(load_checkpoint(model), device=device)
    except CheckpointError as error:
        raise _fail(error) from None
    failures = 0
    for path in files:
        try:
            prediction = predictor.predict(path, top_k)
        except (AudioError, OSError) as error:
            failures += 1
            click.echo(f"{path}: cannot label: {error}", err=True)
            continue
        if as_json:
            click.echo(json.dumps(prediction.to_json(scores, embedding)))
        else:
            labels = ", ".join(
                f"{label} {score:.3f}"
                for label, score in zip(prediction.top_labels, prediction.top_scores, strict=True)
            )
            click.echo(f"{path}: {labels}")
    if failures:
        sys.exit(1)


@main.command()
@click.argument("inputs", nargs=-1)
@click.option("--output", "-o", required=True, help="Output folder or URI (s3://bucket/prefix).")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--manifest", help="File listing input URIs: text (one per line), CSV or Parquet.")
@click.option(
    "--batch-size", type=int, help="Windows per model batch [default: 64 on GPU, 16 on CPU]."
)
@click.option("--feature-actors", type=int, help="CPU fbank actors [default: CPUs/4, at least 1].")
@click.option(
    "--classifier-actors",
    type=int,
    help="Model actors [default: one per GPU; on CPU one per 8 CPUs].",
)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
@click.option(
    "--precision",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    help="auto: bf16 autocast on GPU, fp32 on CPU.",
)
@click.option(
    "--window-s", type=float, help="Window length in seconds [default: the model's input, 10.24]."
)
@click.option(
    "--hop-s", type=float, help="Hop between windows in seconds [default: the window length]."
)
@click.option("--top-k", default=5, show_default=True, type=int)
@click.option(
    "--max-duration-s",
    default=3600.0,
    show_default=True,
    type=float,
    help="Files longer than this become error rows.",
)
@click.option(
    "--files-per-unit",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Plain audio files grouped per output file.",
)
@click.option(
    "--norm-stats", help="JSON from `jobs.norm_stats` to use instead of AudioSet's mean/std."
)
@click.option(
    "--overwrite", is_flag=True, help="Delete this output's earlier results and start again."
)
@click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster to join [default: a local Ray].")
def run(
    inputs,
    output,
    model,
    manifest,
    batch_size,
    feature_actors,
    classifier_actors,
    device,
    precision,
    window_s,
    hop_s,
    top_k,
    max_duration_s,
    files_per_unit,
    norm_stats,
    overwrite,
    address,
) -> None:
    """Label INPUTS (tar shards, audio files, folders, globs, brace ranges, s3:// URIs) into
    Parquet under --output, exactly once per file; rerun the same command to resume."""
    from pipeline.run import RunConfig, format_summary, run_labeling

    config = RunConfig(
        inputs=tuple(inputs),
        output=output,
        model=model,
        manifest=manifest,
        batch_size=batch_size,
        feature_actors=feature_actors,
        classifier_actors=classifier_actors,
        device=device,
        precision=precision,
        window_s=window_s,
        hop_s=hop_s,
        top_k=top_k,
        max_duration_s=max_duration_s,
        files_per_unit=files_per_unit,
        norm_stats=norm_stats,
        overwrite=overwrite,
        address=address,
    )
    try:
        summary = run_labeling(config, echo=lambda line: click.echo(line, err=True))
    except _user_errors() as error:
        raise _fail(error) from None
    click.echo(format_summary(summary))


@main.command()
@click.option(
    "--output",
    "-o",
    default="ast-label-demo",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for the generated corpus and its labels.",
)
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
def demo(output: Path, model: str) -> None:
    """Generate a small synthetic corpus, label it with the real pipeline in local mode, and show
    what came out."""
    from pipeline.demo import run_demo

    try:
        run_demo(output, model=model, echo=click.echo)
    except _user_errors() as error:
        raise _fail(error) from None


def _register_cluster_commands() -> None:
    from pipeline.submit import status_command, stop_command, submit_command

    main.add_command(submit_command, "submit")
    main.add_command(status_command, "status")
    main.add_command(stop_command, "stop")


_register_cluster_commands()
