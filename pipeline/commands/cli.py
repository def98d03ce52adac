"""The `ast-label` command line: every command, and the one table of exit statuses.

Each command is one function that parses options, calls the library and prints; the library
raises the error types of pipeline.errors (and ast_model's CheckpointError), which `_Command`
turns into one line on stderr and the exit status of EXIT_STATUSES, for every command alike.
The Ray jobs (`python -m jobs.label`, `python -m jobs.norm_stats`) run these same commands.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path

import click

from ast_model.config import DEFAULT_MODEL
from pipeline import defaults
from pipeline.cluster import prepare_token_auth
from pipeline.errors import Interrupted, RunIncomplete, UserError, WorkFailed

# torch, Ray and the model code load inside the commands that need them: `ast-label submit`,
# `status` and `--help` answer in a fraction of a second.

# (exit status, error types, what it means): the one mapping, also printed by `ast-label --help`.
# Types given as "module:Name" are named, not imported: pipeline.storage loads fsspec, and an
# error of a module that was never imported cannot have been raised.
EXIT_STATUSES: tuple[tuple[int, tuple[type[Exception] | str, ...], str], ...] = (
    (0, (), "done"),
    (1, (WorkFailed,), "part of the work failed: files predict could not label, a failed job"),
    (
        2,
        (UserError, "ast_model.checkpoint_files:CheckpointError"),
        'a problem to fix (option, input, output, model, cluster): one line "Error: ..."',
    ),
    (
        3,
        (RunIncomplete, "pipeline.storage:StorageError"),
        "incomplete: units did not commit, or the store kept failing; run the same command again",
    ),
    (130, (Interrupted,), "interrupted"),
)
# Environment variables whose values never appear in a message, whatever a library put in it.
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")

DEMO_MODEL_NOTE = (
    "note: the bundled model is a demo model of 10 synthetic classes (tones, noises, clicks): "
    "use real weights (--model) for real audio"
)
MODEL_HELP = (
    "Hugging Face AST checkpoint: a folder or URI (s3://...) holding config.json and "
    "model.safetensors, a hub id, or an original AST .pth. Default: the bundled demo model."
)


def exit_status(error: BaseException) -> int | None:
    """The exit status of an error the library raised; None for anything else (a bug)."""
    for status, error_types, _ in EXIT_STATUSES:
        for error_type in error_types:
            if isinstance(error_type, str):
                module_name, name = error_type.split(":")
                error_type = getattr(sys.modules.get(module_name), name, None)
            if error_type is not None and isinstance(error, error_type):
                return status
    return None


def one_line(error: BaseException) -> str:
    """The error's message on one line, with the value of every secret variable masked."""
    text = " ".join(str(error).split()) or type(error).__name__
    for name in SECRET_VARIABLES:
        secret = os.environ.get(name, "")
        if len(secret) >= 8:  # a shorter value would mask ordinary words, and guards nothing
            text = text.replace(secret, "***")
    return text


class _Failure(click.ClickException):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.exit_code = status


def _one_line_usage(parse):
    """An option or argument mistake as one line naming the help to read, not click's usage
    block (which `--help` shows)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return parse(self, ctx, args)
        except click.UsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # click >= 8.2: bare group = help
                raise
            help_command = f"{ctx.command_path} --help"
            raise _Failure(f"{error.format_message()} (see `{help_command}`)", 2) from None

    return parse_args


class _Command(click.Command):
    """Every ast-label command: a library error becomes `Error: <one line>` on stderr and its
    exit status. Bugs keep their traceback."""

    parse_args = _one_line_usage(click.Command.parse_args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Failure("interrupted", 130) from None
        except Exception as error:
            status = exit_status(error)
            if status is None:
                raise
            message = one_line(error)
            if status == 3 and not isinstance(error, RunIncomplete):  # the store, after retries
                message += ": the store kept failing; run the same command again"
            raise _Failure(message, status) from None


class _Group(click.Group):
    command_class = _Command
    parse_args = _one_line_usage(click.Group.parse_args)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as error:
            raise _Failure(
                f"{error.format_message()} (see `{ctx.command_path} --help`)", 2
            ) from None


def _epilog() -> str:
    rows = "\n".join(f"  {status:<4} {meaning}" for status, _, meaning in EXIT_STATUSES)
    bug = "  (an internal error, a bug, shows its traceback and exits 1)"
    return f"\b\nExit status, every command:\n{rows}\n{bug}"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_epilog())
@click.version_option(package_name="ast-label")
def main() -> None:
    """Label audio corpora with the Audio Spectrogram Transformer (AST) on Ray."""


def _note(line: str) -> None:
    click.echo(line, err=True)


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
        _note("skipped (not inputs): " + ", ".join(f"{n} {why}" for why, n in plan.skipped.items()))
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
@click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster to join [default: a local Ray].")
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's own logs and progress bars.")
def run_command(inputs, **options) -> None:
    """Label INPUTS (tar shards, audio files, folders, globs, brace ranges, s3:// URIs) into
    Parquet under --output, exactly once per file. Run the same command again to resume, or to
    label what is new when the input has grown."""
    prepare_token_auth(options["address"])
    from pipeline.labeling.run import run_labeling
    from pipeline.settings import LabelingOptions, RunConfig

    config = RunConfig(tuple(inputs), options=LabelingOptions.take(options), **options)
    with _progress() as progress:
        echo = _note_if_demo_model(config.options.model, progress.note)
        summary = run_labeling(config, echo=echo, progress=progress)
    _report(summary)


def _note_if_demo_model(model: str, echo=_note):
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
@click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster to join [default: a local Ray].")
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's own logs and progress bars.")
def relabel_command(source, **options) -> None:
    """Score an existing OUTPUT with a head into a new output, from its stored embeddings: no
    audio is read, no transformer runs. Every column is kept, the head's are added; rerun the same
    command to resume."""
    prepare_token_auth(options["address"])
    from pipeline.heads.relabel import RelabelConfig, relabel

    with _progress() as progress:
        summary = relabel(RelabelConfig(source, **options), echo=progress.note, progress=progress)
    _report(summary)


@contextlib.contextmanager
def _progress():
    """The progress line of a run, shown from its first second: in place on a terminal, a line
    per interval in a log; cleared when the run ends, however it ends, before anything else is
    printed."""
    from pipeline.commands.progress import Progress

    write = functools.partial(click.echo, err=True, nl=False)
    progress = Progress(write=write, live=sys.stderr.isatty())
    try:
        yield progress
    finally:
        progress.finish()


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
@click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster to join [default: a local Ray].")
def norm_stats_command(inputs, output, manifest, files_per_unit, max_duration_s, address) -> None:
    """Measure the fbank mean and std of INPUTS (as `run` takes them) into a JSON file for
    `ast-label run --norm-stats`."""
    prepare_token_auth(address)
    from pipeline.commands.norm_stats import compute_norm_stats

    stats = compute_norm_stats(
        inputs, manifest, files_per_unit, max_duration_s, address, echo=_note
    )
    stats.save(output)
    click.echo(
        f"mean {stats.mean:.6f} std {stats.std:.6f} over {stats.frames} frames of {stats.files} "
        f"files ({stats.errors} unreadable) -> {output}"
    )


# --- inspect -------------------------------------------------------------------------------------


@main.command("inspect")
@click.argument("output")
@click.option("--label", "-l", help="Show the files where this label scores at least --min-score.")
@click.option(
    "--min-score",
    type=float,
    help="With --label: the score a window must reach (the max over a file's windows counts) "
    f"[default: a head label's threshold, else {defaults.INSPECT_MIN_SCORE}].",
)
@click.option(
    "--top",
    default=defaults.INSPECT_TOP,
    show_default=True,
    type=click.IntRange(min=0),
    help="Rows shown per table (0: all).",
)
@click.option(
    "--plot",
    metavar="FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the label distribution and long files' timelines: FILE.png (.svg, .pdf), "
    "or FILE.html for a report with the tables. Needs the plot extra (matplotlib).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout instead of text.")
def inspect_command(
    output: str,
    label: str | None,
    min_score: float | None,
    top: int,
    plot: Path | None,
    as_json: bool,
) -> None:
    """Counts, label distribution and label queries of an output folder or URI (s3://...)."""
    from pipeline.commands.inspect_report import format_inspection, inspection_json
    from pipeline.commands.inspection import TIMELINE_FILES, inspect_output

    if plot is not None:
        from pipeline.commands.plots import check_plot_path

        check_plot_path(plot)  # before reading the whole output
    inspection = inspect_output(
        output, label, min_score, timelines=TIMELINE_FILES if plot is not None else 0
    )
    if as_json:
        click.echo(json.dumps(inspection_json(inspection, top)))
    else:
        click.echo(format_inspection(inspection, top))
    if plot is not None:
        from pipeline.commands.plots import write_plot

        _note(f"wrote {write_plot(inspection, plot, top)}")


# --- a Ray cluster's Jobs API (submit.py) ------------------------------------------------------

_ADDRESS_OPTION = click.option(
    "--address",
    envvar="RAY_ADDRESS",
    required=True,
    metavar="URL",
    help="The cluster's Jobs API, http://HEAD:8265 (default: $RAY_ADDRESS).",
)


@main.command(
    "submit",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@_ADDRESS_OPTION
@click.option("--no-wait", is_flag=True, help="Print the job id and return without following it.")
@click.option(
    "--working-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="The project directory to upload (default: this ast-label checkout).",
)
@click.argument("job_args", nargs=-1, type=click.UNPROCESSED)
def submit_command(
    address: str, no_wait: bool, working_dir: Path | None, job_args: tuple[str, ...]
) -> None:
    """Submit a job to a Ray cluster: ast-label submit --address URL -- run INPUT... --output URI.

    The job is `run` or `norm-stats` with the same arguments as the local command. Follows the
    job's logs until it ends; exits 0 only when it SUCCEEDED.
    """
    from pipeline.commands.submit import follow_job, submit_job

    client, job_id = submit_job(address, job_args, working_dir, echo=_note)
    if no_wait:
        click.echo(job_id)
        return
    _note(f"submitted job {job_id}; Ctrl-C stops following it, not the job")
    try:
        follow_job(
            client, address, job_id, write=lambda chunk: click.echo(chunk, nl=False), echo=_note
        )
    except KeyboardInterrupt:
        _note("")
        raise Interrupted(
            f"stopped following job {job_id}, which keeps running: `ast-label stop {job_id}` "
            "ends it"
        ) from None
    _note(f"job {job_id} SUCCEEDED")


@main.command("status")
@_ADDRESS_OPTION
@click.argument("job_id")
def status_command(address: str, job_id: str) -> None:
    """Print a submitted job's status (and why it ended, when it did not succeed)."""
    from ray.job_submission import JobStatus

    from pipeline.commands.submit import job_details, job_reason

    details = job_details(address, job_id)
    click.echo(f"{job_id} {details.status}")
    click.echo(f"  entrypoint: {details.entrypoint}")
    if details.status in (JobStatus.FAILED, JobStatus.STOPPED):
        click.echo(f"  reason: {job_reason(details)}")


@main.command("stop")
@_ADDRESS_OPTION
@click.argument("job_id")
def stop_command(address: str, job_id: str) -> None:
    """Stop a submitted job and wait (up to a minute) until Ray reports it ended."""
    from pipeline.commands.submit import stop_job

    click.echo(f"{job_id} {stop_job(address, job_id)}")


# --- heads ---------------------------------------------------------------------------------------

# The heads' defaults; a light module (no scikit-learn, no torch), imported here beside its use.
from pipeline.heads import options as head_options  # noqa: E402


@main.group("head", cls=_Group)
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
    with _progress() as progress:
        result = train_head(config, echo=progress.note, progress=progress)
    click.echo(result.table)
    _note(f"wrote {result.head.name} (head.safetensors sha256 {result.head.sha256[:12]})")
    if result.plot is not None:
        _note(f"wrote {result.plot}")
