"""Real Ray nodes on 127.0.0.1 for tests. A two-node cluster: a head node and a "GPU" worker node.

The worker advertises one GPU as a Ray resource although the machine has none, so the scheduler
places GPU actors there exactly as on a real cluster, and the model then runs on that node's CPU.

Token authentication is on, with a token of the cluster's own (RAY_AUTH_TOKEN_PATH), so it never
touches ~/.ray/auth_token, which other local Rays on this machine share. Every `ray start` runs in
a session of its own; stopping signals exactly the processes of those sessions (never `ray stop`,
which would end every Ray on the machine).

`start_local_head` starts one node without dashboard or token instead: the Ray that
`ast-label run --address` joins on a machine where someone keeps `ray start --head` running.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from processes import session_pids

# The venv's own `ray` and `python`: job entrypoints run `python -m jobs.X` from PATH.
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(kw_only=True)
class StartedRay:
    """The nodes some `ray start`s began, each in a session of its own."""

    gcs_address: str  # what `ray start --address` (and `ast-label run --address`) takes
    temp_dir: Path
    env: dict[str, str]  # the environment the nodes were started with
    session_ids: list[int] = field(default_factory=list)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to every process in the sessions our `ray start`s opened."""
        for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            pids = [p for sid in self.session_ids for p in session_pids(sid)]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while pids and time.monotonic() < deadline:
                time.sleep(0.2)
                pids = [p for sid in self.session_ids for p in session_pids(sid)]
            if not pids:
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass(kw_only=True)
class LoopbackCluster(StartedRay):
    dashboard_url: str  # the Jobs API, http://127.0.0.1:PORT
    token_path: Path

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def client_env(self, **overrides: str) -> dict[str, str]:
        """An environment for a CLI process run by the test user: finds the cluster's token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        env.update(overrides)
        return env


def _ray_start(args: list[str], env: dict[str, str], cluster: StartedRay) -> str:
    # start_new_session: the child calls setsid(), so its PID is the session id that every Ray
    # process it spawns inherits.
    process = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    cluster.session_ids.append(process.pid)
    output, _ = process.communicate(timeout=180)
    if process.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{output}")
    return output


def _wait_for_nodes(cluster: LoopbackCluster, count: int, timeout_s: float = 120.0) -> None:
    request = urllib.request.Request(
        f"{cluster.dashboard_url}/nodes?view=summary",
        headers={"Authorization": f"Bearer {cluster.token}"},
    )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                summary = json.loads(response.read())["data"]["summary"]
            if sum(node["raylet"].get("state") == "ALIVE" for node in summary) >= count:
                return
        except (OSError, ValueError, KeyError):
            pass  # the dashboard is still starting
        if time.monotonic() > deadline:
            raise RuntimeError(f"the loopback cluster did not reach {count} live nodes")
        time.sleep(1.0)


def start_loopback_cluster(head_cpus: int = 2, gpu_node_cpus: int = 1) -> LoopbackCluster:
    """Head (head_cpus CPUs, no GPU) + worker (gpu_node_cpus CPUs, 1 GPU) on 127.0.0.1.

    The nodes inherit this process's environment (the S3 endpoint and credentials the tests set),
    as real nodes inherit their instance's settings.
    """
    # Short and not named `ray`: Ray's Unix socket paths must stay under 107 bytes, and a folder
    # named `ray` beside a script shadows the ray package.
    temp_dir = Path(tempfile.mkdtemp(prefix="astl-rc-", dir="/tmp"))
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
    )
    dashboard_port = free_port()
    cluster = LoopbackCluster(
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        gcs_address="",
        token_path=token_path,
        temp_dir=temp_dir,
        env=env,
    )
    try:
        output = _ray_start(
            [
                "--head",
                f"--port={free_port()}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                *_node_ports(),
                f"--num-cpus={head_cpus}",
                "--num-gpus=0",
                f"--temp-dir={temp_dir}",
            ],
            env,
            cluster,
        )
        match = re.search(r"--address='([^']+)'", output)
        if match is None:
            raise RuntimeError(f"cannot find the head's address in:\n{output}")
        cluster.gcs_address = match.group(1)
        _ray_start(
            [
                f"--address={cluster.gcs_address}",
                *_node_ports(),
                f"--num-cpus={gpu_node_cpus}",
                "--num-gpus=1",
            ],
            env,
            cluster,
        )
        _wait_for_nodes(cluster, 2)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _node_ports() -> list[str]:
    # Each node of the pair needs its own agent and metrics ports: their defaults are fixed
    # numbers that would collide between two nodes on one machine (and with other local Rays).
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def start_local_head(env: dict[str, str], cpus: int = 2) -> StartedRay:
    """One node on 127.0.0.1 without dashboard or token: the Ray that `ast-label run --address`
    joins when someone keeps a `ray start --head` running on their machine.

    Its processes, and so every Ray worker of every run that joins it, inherit `env` (for the fault
    tests: the proxy's endpoint and the shortened retries).
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="astl-rh-", dir="/tmp"))
    env = {k: v for k, v in env.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
    )
    cluster = StartedRay(gcs_address=f"127.0.0.1:{free_port()}", temp_dir=temp_dir, env=env)
    try:
        _ray_start(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={cluster.gcs_address.rsplit(':', 1)[1]}",
                "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}",
                *_node_ports(),
                f"--num-cpus={cpus}",
                "--num-gpus=0",
                f"--temp-dir={temp_dir}",
            ],
            env,
            cluster,
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster
