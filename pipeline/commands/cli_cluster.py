"""The commands of a Ray cluster's Jobs API: `submit` (a `run` or `norm-stats` job), `status`,
`stop` (pipeline.commands.submit does the work)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.commands.cli_core import main, note
from pipeline.errors import Interrupted

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

    client, job_id = submit_job(address, job_args, working_dir, echo=note)
    if no_wait:
        click.echo(job_id)
        return
    note(f"submitted job {job_id}; Ctrl-C stops following it, not the job")
    try:
        follow_job(
            client, address, job_id, write=lambda chunk: click.echo(chunk, nl=False), echo=note
        )
    except KeyboardInterrupt:
        note("")
        raise Interrupted(
            f"stopped following job {job_id}, which keeps running: `ast-label stop {job_id}` "
            "ends it"
        ) from None
    note(f"job {job_id} SUCCEEDED")


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
