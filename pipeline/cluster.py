"""Joining Ray: the one place that decides between a cluster and a Ray of this machine's own."""

from __future__ import annotations


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        # Inside a Ray job RAY_ADDRESS names the job's cluster (the CLI reads it into --address).
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    else:
        # "local" starts a Ray on this machine: plain ray.init() would instead join whatever
        # cluster `ray start` last left running here. The dashboard's dozen processes cost seconds
        # and memory that a local run does not need.
        ray.init(
            address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR"
        )
