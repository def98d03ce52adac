"""The `ast-label` command group and what every command shares: the one table of exit statuses,
errors as one line, option mistakes as one line, and the progress line of long commands.

Each command is one function that parses options, calls the library and prints (cli_labeling.py,
cli_heads.py, cli_output.py, cli_cluster.py; cli.py gathers them); the library raises the error
types of pipeline.errors (and ast_model's CheckpointError), which `Command` turns into one line on
stderr and the exit status of EXIT_STATUSES, for every command alike.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import click

from pipeline.errors import Interrupted, RunIncomplete, UserError, WorkFailed

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

ADDRESS_HELP = "Ray cluster to join [default: a local Ray]."
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


class Command(click.Command):
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


class Group(click.Group):
    command_class = Command
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


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_epilog())
@click.version_option(package_name="ast-label")
def main() -> None:
    """Label audio corpora with the Audio Spectrogram Transformer (AST) on Ray."""


def note(line: str) -> None:
    """A message for the user, on stderr (stdout holds the command's result)."""
    click.echo(line, err=True)


@contextlib.contextmanager
def run_progress():
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
