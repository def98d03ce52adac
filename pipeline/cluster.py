"""Joining Ray: the one place that decides between a cluster and a Ray of this machine's own, and
that finds the cluster's token.

A run joins the cluster at --address (a `ray start --head` on this machine for a quick loop on
samples, or a real cluster), or starts a Ray of its own that ends with the command, every process
of it. Ray's token authentication (on by default since Ray 2.5x) is handled the way Ray itself
finds tokens: RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

IDLE_WORKER_MS = 60_000
# Set by Ray's job supervisor for the entrypoint of a submitted job (ray.dashboard's job module).
SUBMITTED_JOB_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# How long the processes of a Ray of this machine's own get to end after ray.shutdown().
LOCAL_RAY_GRACE_S = 2.0


class ClusterError(UserError):
    """A cluster that cannot be joined, or a token that cannot be read: what to fix."""


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
        raise ClusterError(f"cannot read the Ray token file {path}: {error.strerror}") from None
    if not value:
        raise ClusterError(f"the Ray token file {path} is empty")
    return value


def init_ray(address: str | None, verbose: bool = False) -> None:
    """Joins the cluster at `address`, or starts a Ray of this machine's own. Unless verbose,
    Ray's INFO logs, its progress bars and its workers' output stay off the terminal (they go to
    Ray's log files): ast-label prints its own progress."""
    import ray

    if ray.is_initialized():
        return
    # OpenMP threads that finish their share of an op spin for a while before sleeping. With
    # the fbank tasks and the classifier sharing cores, that spinning burned more CPU than the
    # model itself (4.7 -> 18 ms per clip for a 2-thread forward beside a busy core). Workers
    # inherit this from the driver in local mode; cluster nodes from `ray start` (cluster.yaml).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Ray ends a worker that sits idle for 1 s (above a soft limit of one per CPU) and starts a
    # new one for the next task: with read tasks, commits and Ray Data's own actors taking turns
    # on few CPUs, workers were ended and started over and over, each start 2 CPU-s of imports
    # (torch). Idle workers now live a minute. Read by the raylet that this process starts.
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", str(IDLE_WORKER_MS))
    quiet = {"log_to_driver": verbose, "logging_level": "INFO" if verbose else "ERROR"}
    if address:
        _join(address, quiet)
    else:
        # "local" starts a Ray on this machine: plain ray.init() would instead join whatever
        # cluster `ray start` last left running here. The dashboard's dozen processes cost seconds
        # and memory that a local run does not need; so does Ray Data's usage-stats actor (a
        # worker process of its own), and the stats go nowhere from a machine of its own.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", include_dashboard=False, **quiet)
        _end_with_this_process(ray._private.worker._global_node.get_session_dir_path())
    configure_ray_data(verbose)


def prepare_token_auth(address: str | None) -> None:
    """Before Ray is imported (it reads the mode once): a cluster started with `ray start` uses
    token authentication by default, and a client sends its token only in token mode, so with
    a token at hand, say so. (Ray's own default would retry an unauthenticated connection for
    20 s, then fail.)"""
    if address and "ray" not in sys.modules and find_ray_token() is not None:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def _join(address: str, quiet: dict) -> None:
    import ray

    try:
        # Inside a Ray job RAY_ADDRESS names the job's cluster (the CLI reads it into --address).
        ray.init(address=address, **quiet)
    except (ConnectionError, ray.exceptions.AuthenticationError) as error:
        reason = " ".join(str(error).split())[:200]
        raise ClusterError(
            f"cannot join the Ray cluster at {address} ({reason}): check --address (or "
            "RAY_ADDRESS) and that the cluster is up; its token is read from RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
        ) from None


def _end_with_this_process(session_dir: str) -> None:
    """Ends a Ray of this machine's own with this process, every process of it: ray.shutdown()
    leaves Ray's agents to notice on their own that the raylet is gone, which took 44-90 s.
    Registered after ray.init, so it runs before Ray's own exit handler."""

    def end() -> None:
        import ray

        ray.shutdown()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = _pids_mentioning(session_dir)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + LOCAL_RAY_GRACE_S
            while pids and time.monotonic() < deadline:
                time.sleep(0.05)
                pids = _pids_mentioning(session_dir)
            if not pids:
                return

    atexit.register(end)


def _pids_mentioning(session_dir: str) -> list[int]:
    """Processes whose command line names the Ray session's folder (Ray's own processes)."""
    needle = session_dir.encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def is_a_cluster(address: str | None) -> bool:
    """Whether a run uses Ray as a cluster (commits as tasks spread over the nodes, actors that
    restart when a node is lost) rather than as this machine's: it joined Ray (--address) and
    the Ray has more than one node, or the run is a job submitted to a cluster (whose worker
    nodes may come later, and go). A `ray start --head` on this machine is this machine's: Ray
    Data's actors that may restart make Ray log an error-level line at every start, for nothing
    when the only node is the one the driver runs on."""
    import ray

    if not address:
        return False
    if os.environ.get(SUBMITTED_JOB_VARIABLE):
        return True
    return sum(1 for node in ray.nodes() if node.get("Alive")) > 1


def configure_ray_data(verbose: bool) -> None:
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = verbose
    context.enable_operator_progress_bars = verbose
    # Quiet: Ray Data logs each execution's plan, a periodic progress report, and a warning that
    # the progress bars it was just told to turn off are off.
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)
