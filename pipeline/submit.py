"""`ast-label submit | status | stop`: run the labeling jobs on a Ray cluster through its Jobs API.

The job's code travels as the runtime_env working_dir (this project directory, without the venv,
git history, caches and big files), so what runs is the code the user has checked out; the cluster
nodes provide the dependencies. Nothing secret goes into the runtime_env: Ray logs it and shows it
in the dashboard in plain text. Storage credentials come from the nodes' own environment (instance
profile), and the Ray token only travels in the Authorization header.

Token authentication: the Jobs client of Ray 2.60 sends a token only when RAY_AUTH_MODE=token is set
in the client's own environment, which a laptop talking to a remote cluster rarely has. So this
module looks the token up itself, in Ray's documented order (RAY_AUTH_TOKEN, the file named by
RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), and passes it as an explicit header, which Ray's client
never overrides.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

# `ast-label submit -- <command> ...` -> `python -m <module> ...` on the cluster.
JOB_MODULES = {"run": "jobs.label", "norm-stats": "jobs.norm_stats"}

# Never uploaded. Ray also honours the project's .gitignore; these hold without one.
ALWAYS_EXCLUDED = (
    ".venv/",
    "venv/",
    ".git/",
    "__pycache__/",
    "*.pyc",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    "/build/",
    "/dist/",
    "/.whl/",
)
_PRUNED_DIRS = frozenset(
    {".venv", "venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}
)
# A file this big is data, not code: it would be uploaded again with every job (Ray's package
# limit is the 512 MiB gRPC message). Data and models belong in object storage.
BIG_FILE_BYTES = 32 * 1024**2
# The bundled default model must travel whatever its size: `--model default` loads it from here.
ALWAYS_UPLOADED = ("ast_model/default/",)

LOG_POLL_S = 1.0
STOP_WAIT_S = 60.0
EXIT_INTERRUPTED = 130


class CommandError(click.ClickException):
    """A problem the user can fix (address, token, job id): one line, exit status 2."""

    exit_code = 2


class JobEndedBadly(click.ClickException):
    """The job ran and FAILED or was STOPPED: exit status 1, with the job's own reason."""

    exit_code = 1


@dataclass(frozen=True)
class ClusterToken:
    value: str
    source: str  # where it was found, for messages; never the token itself


def find_ray_token(environ: Mapping[str, str] = os.environ) -> ClusterToken | None:
    """The Ray auth token in Ray's order of precedence; None if none or auth is disabled."""
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if value := environ.get("RAY_AUTH_TOKEN", "").strip():
        return ClusterToken(value, "RAY_AUTH_TOKEN")
    if token_path := environ.get("RAY_AUTH_TOKEN_PATH"):
        # Ray treats an unreadable file named here as a misconfiguration, not a reason to fall back.
        return ClusterToken(_read_token_file(Path(token_path).expanduser()), token_path)
    default_path = Path.home() / ".ray" / "auth_token"
    if default_path.is_file():
        return ClusterToken(_read_token_file(default_path), str(default_path))
    return None


def _read_token_file(path: Path) -> str:
    try:
        value = path.read_text().strip()
    except OSError as error:
        raise CommandError(f"cannot read the Ray token file {path}: {error.strerror}") from None
    if not value:
        raise CommandError(f"the Ray token file {path} is empty")
    return value


def job_entrypoint(job_args: Sequence[str]) -> str:
    """['run', 'in/', '--output', 'o'] -> 'python -m jobs.label in/ --output o' (shell-quoted)."""
    if not job_args:
        raise click.UsageError(f"name the job after '--': one of {', '.join(JOB_MODULES)}")
    command, *arguments = job_args
    module = JOB_MODULES.get(command)
    if module is None:
        raise click.UsageError(
            f"unknown job {command!r}: submit one of {', '.join(JOB_MODULES)}, "
            "e.g. ast-label submit --address URL -- run INPUT... --output URI"
        )
    return shlex.join(["python", "-m", module, *arguments])


def default_working_dir() -> Path:
    """The ast-label source checkout this module was imported from."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise CommandError(
            f"{root} is not an ast-label source checkout: pass --working-dir pointing at one"
        )
    return root


def job_runtime_env(working_dir: Path, echo=click.echo) -> dict[str, object]:
    """A job's runtime_env: the project directory as working_dir, minus what must not travel."""
    working_dir = working_dir.resolve()
    excludes = list(ALWAYS_EXCLUDED)
    for path, size in _big_files(working_dir):
        echo(
            f"not uploading {path} ({size / 1024**2:.0f} MiB): data and models belong in "
            "object storage, the working directory travels with every job",
            err=True,
        )
        excludes.append("/" + re.sub(r"([\[\]*?!#\\])", r"\\\1", path))
    return {"working_dir": str(working_dir), "excludes": excludes}


def _big_files(root: Path) -> Iterator[tuple[str, int]]:
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in _PRUNED_DIRS)
        for name in sorted(files):
            path = Path(directory, name)
            relative = path.relative_to(root).as_posix()
            if relative.startswith(ALWAYS_UPLOADED) or path.is_symlink():
                continue
            size = path.stat().st_size
            if size > BIG_FILE_BYTES:
                yield relative, size


@contextmanager
def _pinned_api_server_address(address: str) -> Iterator[None]:
    # Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS in the environment override its
    # address argument; pin the highest-precedence one so --address always wins.
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def connect(address: str) -> JobSubmissionClient:
    """A Jobs API client for http(s)://HOST:PORT, authenticated when a token is available."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if not re.match(r"^https?://[^/\s]+/?$", address):
        raise CommandError(
            f"--address must be the cluster's Jobs API URL, like http://127.0.0.1:8265 "
            f"(got {address!r}); `ray dashboard cluster.yaml` forwards it to this machine"
        )
    token = find_ray_token()
    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    try:
        with _pinned_api_server_address(address):
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as error:
        raise CommandError(_auth_failure(address, token, str(error))) from None
    except (ConnectionError, requests.RequestException):
        raise CommandError(
            f"cannot reach the Ray Jobs API at {address}: is the cluster up and its dashboard "
            "port forwarded (ray dashboard cluster.yaml)?"
        ) from None


def _auth_failure(address: str, token: ClusterToken | None, ray_message: str) -> str:
    if token is None or ray_message.startswith("Authentication required"):
        return (
            f"the Ray cluster at {address} requires a token and none was found: set "
            "RAY_AUTH_TOKEN_PATH to the token file (or put it in ~/.ray/auth_token); "
            "`ray get-auth-token` on the head node prints it"
        )
    return f"the Ray cluster at {address} rejected the token from {token.source}"


def _call(address: str, job_id: str, request):
    """Runs a client request; a missing job or a lost connection becomes one clear line."""
    import requests

    try:
        return request()
    except RuntimeError as error:
        if "404" in str(error) or "does not exist" in str(error):
            raise CommandError(f"no job {job_id} on the cluster at {address}") from None
        raise
    except (ConnectionError, requests.RequestException):
        raise CommandError(f"lost the connection to the Ray Jobs API at {address}") from None


def _wait_until_done(
    client: JobSubmissionClient, address: str, job_id: str, timeout_s: float | None = None
) -> JobStatus:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = _call(address, job_id, lambda: client.get_job_status(job_id))
        if status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(LOG_POLL_S)


async def _print_logs(client: JobSubmissionClient, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        click.echo(chunk, nl=False)


def _follow(client: JobSubmissionClient, address: str, job_id: str) -> None:
    try:
        asyncio.run(_print_logs(client, job_id))
    except Exception as error:  # noqa: BLE001 - any stream failure: fall back to polling
        click.echo(f"log stream interrupted ({error}); waiting for the job to end", err=True)
    _wait_until_done(client, address, job_id)


def job_reason(details: JobDetails) -> str:
    """The most telling line of a finished job's message: for a failed entrypoint, Ray appends the
    last logs to its message, and their last line is the error our jobs print."""
    lines = [line.strip() for line in (details.message or "").splitlines() if line.strip()]
    reason = lines[-1] if lines else "no message from Ray"
    if details.driver_exit_code:
        reason += f" (exit code {details.driver_exit_code})"
    return reason


def _finish(client: JobSubmissionClient, address: str, job_id: str) -> None:
    from ray.job_submission import JobStatus

    details = _call(address, job_id, lambda: client.get_job_info(job_id))
    if details.status == JobStatus.SUCCEEDED:
        click.echo(f"job {job_id} SUCCEEDED", err=True)
        return
    raise JobEndedBadly(f"job {job_id} {details.status}: {job_reason(details)}")


ADDRESS_OPTION = click.option(
    "--address",
    envvar="RAY_ADDRESS",
    required=True,
    metavar="URL",
    help="The cluster's Jobs API, http://HEAD:8265 (default: $RAY_ADDRESS).",
)


@click.command(
    "submit",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@ADDRESS_OPTION
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
    entrypoint = job_entrypoint(job_args)
    working_dir = working_dir or default_working_dir()
    module = JOB_MODULES[job_args[0]].replace(".", "/") + ".py"
    if not (working_dir / module).is_file():
        raise CommandError(
            f"{working_dir} has no {module}: pass the ast-label project as --working-dir"
        )
    runtime_env = job_runtime_env(working_dir)
    # Ray logs each nested .gitignore it honours and each closing of the log stream at INFO;
    # warnings (a big file, a big package) still show.
    for name in ("ray._private.runtime_env.packaging", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    client = connect(address)
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    except (RuntimeError, ValueError) as error:  # e.g. a working dir over Ray's package limit
        raise CommandError(f"the cluster at {address} refused the job: {error}") from None
    if no_wait:
        click.echo(job_id)
        return
    click.echo(f"submitted job {job_id}; Ctrl-C stops following it, not the job", err=True)
    try:
        _follow(client, address, job_id)
    except KeyboardInterrupt:
        click.echo(f"\njob {job_id} keeps running; `ast-label stop {job_id}` ends it", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    _finish(client, address, job_id)


@click.command("status")
@ADDRESS_OPTION
@click.argument("job_id")
def status_command(address: str, job_id: str) -> None:
    """Print a submitted job's status (and why it ended, when it did not succeed)."""
    from ray.job_submission import JobStatus

    client = connect(address)
    details = _call(address, job_id, lambda: client.get_job_info(job_id))
    click.echo(f"{job_id} {details.status}")
    click.echo(f"  entrypoint: {details.entrypoint}")
    if details.status in (JobStatus.FAILED, JobStatus.STOPPED):
        click.echo(f"  reason: {job_reason(details)}")


@click.command("stop")
@ADDRESS_OPTION
@click.argument("job_id")
def stop_command(address: str, job_id: str) -> None:
    """Stop a submitted job and wait (up to a minute) until Ray reports it ended."""
    client = connect(address)
    _call(address, job_id, lambda: client.stop_job(job_id))
    status = _wait_until_done(client, address, job_id, timeout_s=STOP_WAIT_S)
    click.echo(f"{job_id} {status}")
