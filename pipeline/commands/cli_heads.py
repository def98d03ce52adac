"""`ast-label head ...`: your own labels (`head train`; a head is applied by `run --head`,
`predict --head` and `relabel`)."""

from __future__ import annotations

import click

from pipeline import defaults
from pipeline.cluster import prepare_token_auth
from pipeline.commands.cli_core import MODEL_HELP, Group, main, note, run_progress

# The heads' defaults: a light module (no scikit-learn, no torch).
from pipeline.heads import options as head_options

# --- heads ---------------------------------------------------------------------------------------


@main.group("head", cls=Group)
def head_group() -> None:
    """Your own labels: linear heads on the embeddings that ast-label stores."""


@head_group.command("train")
@click.argument("examples")
@click.option(
    "--output",
    "-o",
    required=True,
    metavar="HEAD",
    help="The head's folder (a path or s3:// URI): head.safetensors, config.json, README.md.",
)
@click.option(
    "--model",
    "-m",
    help=MODEL_HELP + " With --from-output: the output's model (checked when given).",
)
@click.option(
    "--from-output",
    metavar="OUTPUT",
    help="Take the examples' embeddings from the rows of this ast-label output (made with the "
    "same model) instead of decoding audio. EXAMPLES names files as the output does.",
)
@click.option(
    "--multi-label",
    is_flag=True,
    help="Sigmoid scores, each label on its own, even when every example has one label "
    "[default: multi-label when some window has several labels].",
)
@click.option(
    "--folds",
    default=head_options.DEFAULT_FOLDS,
    show_default=True,
    type=click.IntRange(min=2),
    help="Cross-validation folds, split by file: the windows of a file are never on both sides.",
)
@click.option(
    "--target-precision",
    type=click.FloatRange(0, 1, min_open=True),
    metavar="P",
    help="Each label's threshold: the lowest whose held-out precision reaches P "
    "[default: the threshold of the best F1].",
)
@click.option(
    "--c",
    "c",
    default=head_options.DEFAULT_C,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Inverse strength of the L2 penalty on the standardised embedding (scikit-learn's C): "
    "lower it for few examples.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seeds the folds: the same examples and seed give the same head and report.",
)
@click.option(
    "--plot",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Also draw the cross-validation (precision-recall per label, confusion): FILE.png "
    "(.svg, .pdf), or FILE.html with the table. Needs the plot extra (matplotlib).",
)
@click.option("--overwrite", is_flag=True, help="Replace the head already in --output.")
@click.option("--window-s", type=float, help="Window length in seconds, as `run` [default: 10.24].")
@click.option("--hop-s", type=float, help="Hop between windows [default: the window length].")
@click.option(
    "--device",
    default=defaults.DEVICE,
    show_default=True,
    type=click.Choice(defaults.DEVICES),
    help="Where the model runs: auto takes a GPU when there is one.",
)
@click.option("--batch-size", type=int, help="Windows per model batch [default: as `run`].")
@click.option(
    "--max-duration-s",
    default=defaults.MAX_DURATION_S,
    show_default=True,
    type=float,
    help="Longer files are left out (reported).",
)
@click.option("--norm-stats", help="JSON from `ast-label norm-stats` to use instead of AudioSet's.")
@click.option(
    "--ray-above",
    default=head_options.DEFAULT_RAY_ABOVE,
    show_default=True,
    type=click.IntRange(min=0),
    metavar="FILES",
    help="More example files than this are labeled on Ray (`run` into --scratch); fewer in "
    "this process, as `predict` does. 0: always on Ray.",
)
@click.option(
    "--scratch",
    metavar="OUTPUT",
    help="On Ray: the output the examples are labeled into, kept so that a rerun resumes it "
    "[default: a temporary folder, removed]. Needed with --address.",
)
@click.option(
    "--address", envvar="RAY_ADDRESS", help="Ray cluster for the labeling [default: a local Ray]."
)
def head_train_command(examples, output, model, **options) -> None:
    """Train a head on EXAMPLES: a folder with one subfolder per label, or a .csv/.parquet
    manifest (uri, or shard + key; label; optional start_s, end_s). Prints the cross-validation
    and writes the head to --output."""
    prepare_token_auth(options.get("address"))
    from pipeline.heads.train import TrainConfig, train_head
    from pipeline.settings import LabelingOptions

    labeling = LabelingOptions.take(options)
    config = TrainConfig(examples, output, model, options=labeling, **options)
    with run_progress() as progress:
        result = train_head(config, echo=progress.note, progress=progress)
    click.echo(result.table)
    note(f"wrote {result.head.name} (head.safetensors sha256 {result.head.sha256[:12]})")
    if result.plot is not None:
        note(f"wrote {result.plot}")
