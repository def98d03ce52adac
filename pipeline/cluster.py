"""Joining Ray: the one place that decides between a cluster and a Ray of this machine's own."""

from __future__ import annotations

import logging
import os

IDLE_WORKER_MS = 60_000


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
        # Inside a Ray job RAY_ADDRESS names the job's cluster (the CLI reads it into --address).
        ray.init(address=address, **quiet)
    else:
        # "local" starts a Ray on this machine: plain ray.init() would instead join whatever
        # cluster `ray start` last left running here. The dashboard's dozen processes cost seconds
        # and memory that a local run does not need.
        ray.init(address="local", include_dashboard=False, **quiet)
    configure_ray_data(verbose)


def configure_ray_data(verbose: bool) -> None:
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = verbose
    context.enable_operator_progress_bars = verbose
    # Quiet: Ray Data logs each execution's plan, a periodic progress report, and a warning that
    # the progress bars it was just told to turn off are off.
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)
