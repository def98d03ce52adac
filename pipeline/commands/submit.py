"""Running ast-label's jobs on a Ray cluster through its Jobs API: what `ast-label submit`,
`status` and `stop` (cli_cluster.py) call. Failures are typed (pipeline.errors), never click's.

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cluster import ClusterToken, find_ray_token
from pipeline.errors import UserError, WorkFailed

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


class CommandError(UserError):
    """A problem the user can fix: the cluster's address or token, a job id, the job's name."""


class JobEndedBadly(WorkFailed):
    """The job ran and FAILED or was STOPPED; the message holds the job's own reason."""


def job_entrypoint(job_args: Sequence[str]) -> str:
    """['run', 'in/', '--output', 'o'] -> 'python -m jobs.label in/ --output o' (shell-quoted)."""
    if not job_args:
        raise CommandError(f"name the job after '--': one of {', '.join(JOB_MODULES)}")
    command, *arguments = job_args
    module = JOB_MODULES.get(command)
    if module is None:
        raise CommandError(
            f"unknown job {command!r}: submit one of {', '.join(JOB_MODULES)}, "
            "e.g. ast-label submit --address URL -- run INPUT... --output URI"
        )
    return shlex.join(["python", "-m", module, *arguments])


def default_working_dir() -> Path:
    """The ast-label source checkout this module was imported from."""
    root = Path(__file__).resolve().parents[2]  # pipeline/commands/submit.py
    if not (root / "pyproject.toml").is_file():
        raise CommandError(
            f"{root} is not an ast-label source checkout: pass --working-dir pointing at one"
        )
    return root


def job_runtime_env(working_dir: Path, echo: Callable[[str], None] = print) -> dict[str, object]:
    """A job's runtime_env: the project directory as working_dir, minus what must not travel.
    `echo` takes a note per file left behind."""
    working_dir = working_dir.resolve()
    excludes = list(ALWAYS_EXCLUDED)
    for path, size in _big_files(working_dir):
        echo(
            f"not uploading {path} ({size / 1024**2:.0f} MiB): data and models belong in "
            "object storage, the working directory travels with every job"
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


async def _print_logs(
    client: JobSubmissionClient, job_id: str, write: Callable[[str], None]
) -> None:
    async for chunk in client.tail_job_logs(job_id):
        write(chunk)


def job_reason(details: JobDetails) -> str:
    """The most telling line of a finished job's message: for a failed entrypoint, Ray appends the
    last logs to its message, and their last line is the error our jobs print."""
    lines = [line.strip() for line in (details.message or "").splitlines() if line.strip()]
    reason = lines[-1] if lines else "no message from Ray"
    if details.driver_exit_code:
        reason += f" (exit code {details.driver_exit_code})"
    return reason


def submit_job(
    address: str,
    job_args: Sequence[str],
    working_dir: Path | None = None,
    echo: Callable[[str], None] = print,
) -> tuple[JobSubmissionClient, str]:
    """Submits `ast-label <job_args>` (run or norm-stats) with this project as its working
    directory; returns the client and the job id. `echo` takes notes for the user."""
    entrypoint = job_entrypoint(job_args)
    working_dir = working_dir or default_working_dir()
    module = JOB_MODULES[job_args[0]].replace(".", "/") + ".py"
    if not (working_dir / module).is_file():
        raise CommandError(
            f"{working_dir} has no {module}: pass the ast-label project as --working-dir"
        )
    runtime_env = job_runtime_env(working_dir, echo)
    # Ray logs each nested .gitignore it honours and each closing of the log stream at INFO;
    # warnings (a big file, a big package) still show.
    for name in ("ray._private.runtime_env.packaging", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    client = connect(address)
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    except (RuntimeError, ValueError) as error:  # e.g. a working dir over Ray's package limit
        raise CommandError(f"the cluster at {address} refused the job: {error}") from None
    return client, job_id


def follow_job(
    client: JobSubmissionClient,
    address: str,
    job_id: str,
    write: Callable[[str], None],
    echo: Callable[[str], None] = print,
) -> None:
    """Passes the job's logs to `write` until it ends; raises JobEndedBadly unless it
    SUCCEEDED. KeyboardInterrupt stops the following, never the job."""
    from ray.job_submission import JobStatus

    try:
        asyncio.run(_print_logs(client, job_id, write))
    except Exception as error:  # noqa: BLE001 - any stream failure: fall back to polling
        echo(f"log stream interrupted ({error}); waiting for the job to end")
    _wait_until_done(client, address, job_id)
    details = _call(address, job_id, lambda: client.get_job_info(job_id))
    if details.status != JobStatus.SUCCEEDED:
        raise JobEndedBadly(f"job {job_id} {details.status}: {job_reason(details)}")


def job_details(address: str, job_id: str) -> JobDetails:
    client = connect(address)
    return _call(address, job_id, lambda: client.get_job_info(job_id))


def stop_job(address: str, job_id: str) -> JobStatus:
    """Asks Ray to stop the job; returns its status once it ended, or after STOP_WAIT_S."""
    client = connect(address)
    _call(address, job_id, lambda: client.stop_job(job_id))
    return _wait_until_done(client, address, job_id, timeout_s=STOP_WAIT_S)
