"""Cluster jobs through `ast-label submit` on a real two-node Ray cluster on 127.0.0.1.

The head node has two CPUs; the other node one CPU and one GPU (a Ray resource only: the model runs
on that node's CPU). Jobs read from and write to the S3 server on 127.0.0.1, whose address and test
credentials the nodes inherited from the environment they were started in, as real nodes get
theirs from the instance; nothing secret travels with a job.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from audio_corpus import encode, tar_bytes
from conftest import write_hf_checkpoint
from ray_cluster import LoopbackCluster, free_port, start_loopback_cluster
from test_norm_stats import noise_clip, reference_norm_stats

from pipeline.cluster import ClusterError, find_ray_token
from pipeline.commands.submit import (
    BIG_FILE_BYTES,
    CommandError,
    connect,
    job_entrypoint,
    job_runtime_env,
)

AST_LABEL = Path(sys.executable).parent / "ast-label"
BUCKET = "cluster-jobs"
JOB_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def cluster(s3_server):
    # s3_server first: the nodes must inherit AWS_ENDPOINT_URL and the test credentials.
    cluster = start_loopback_cluster(head_cpus=2, gpu_node_cpus=1)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def corpus(s3_server, tmp_path_factory):
    """Two tar shards on S3 (three noise clips each) and their waveforms; a tiny model on S3."""
    fs = s3_server.filesystem()
    bucket = s3_server.create_bucket(BUCKET)
    waveforms = []
    for shard in range(2):
        entries = []
        for clip in range(3):
            waveform = noise_clip(0.6 + 0.4 * clip, seed=10 * shard + clip)
            waveforms.append(waveform)
            entries.append((f"s{shard}/clip-{clip}.wav", encode(waveform, 16_000, "wav", "FLOAT")))
        fs.pipe(f"{BUCKET}/in/shard-{shard:06d}.tar", tar_bytes(entries))
    checkpoint = write_hf_checkpoint(tmp_path_factory.mktemp("cluster-model"))
    for path in checkpoint.iterdir():
        fs.put_file(str(path), f"{BUCKET}/model/{path.name}")
    return {"bucket": bucket, "waveforms": waveforms, "model": f"{bucket}/model"}


def ast_label(cluster: LoopbackCluster, *args: str, env: dict | None = None, timeout=JOB_TIMEOUT_S):
    """The installed console script, as a user runs it (finds the token via RAY_AUTH_TOKEN_PATH)."""
    return subprocess.run(
        [str(AST_LABEL), *args],
        env=env or cluster.client_env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit(cluster: LoopbackCluster, *job: str, wait: bool = True):
    flags = [] if wait else ["--no-wait"]
    return ast_label(cluster, "submit", "--address", cluster.dashboard_url, *flags, "--", *job)


def list_state(cluster: LoopbackCluster, what: str) -> list[dict]:
    """Ray's state API through the `ray list` CLI, authenticated as a user would be."""
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "list",
            what,
            "--address",
            cluster.dashboard_url,
            "--format",
            "json",
            "--detail",
            "--limit",
            "10000",
        ],
        env=cluster.client_env(RAY_AUTH_MODE="token"),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "[" in result.stdout, f"ray list {what}: {result.stdout[-2000:]} {result.stderr[-2000:]}"
    return json.loads(result.stdout[result.stdout.index("[") :])


@dataclass
class LabelingJob:
    result: subprocess.CompletedProcess
    output: str  # s3://... of the run
    gpu_nodes: set[str]
    stage_nodes: dict[str, set[str]]  # stage name -> node ids its actors or tasks ran on


@pytest.fixture(scope="module")
def labeling_job(cluster, corpus) -> LabelingJob:
    """One labeling run submitted like a user would, and where its stages ran."""
    output = f"{corpus['bucket']}/labels"
    result = submit(
        cluster,
        "run",
        f"{corpus['bucket']}/in/shard-{{000000..000001}}.tar",
        "--output",
        output,
        "--model",
        corpus["model"],
        "--batch-size",
        "4",
        "--classifier-actors",
        "1",
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    nodes = list_state(cluster, "nodes")
    actors = list_state(cluster, "actors")  # finished actors and tasks stay listed, with a node
    tasks = list_state(cluster, "tasks")
    return LabelingJob(
        result=result,
        output=output,
        gpu_nodes={n["node_id"] for n in nodes if n["resources_total"].get("GPU", 0) >= 1},
        stage_nodes={
            "Classify": {a["node_id"] for a in actors if "(ClassifierActor)" in a["class_name"]},
            # The read tasks fetch, decode and compute the fbank: the CPU-heavy stage.
            "ReadWorkUnitSource": {
                t["node_id"] for t in tasks if t["name"].startswith("ReadWorkUnitSource")
            },
        },
    )


@pytest.mark.slow
def test_labeling_job_runs_from_s3_to_s3_with_classifiers_on_the_gpu_node(labeling_job, s3_server):
    result = labeling_job.result
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert re.search(r"job raysubmit_\w+ SUCCEEDED", result.stderr)

    fs = s3_server.filesystem()
    path = labeling_job.output.removeprefix("s3://")
    rows = pads.dataset(path, format="parquet", filesystem=fs).to_table()
    assert rows.num_rows == 6  # one window per clip, every clip once
    assert rows.column("error").null_count == 6
    assert sorted(rows.column("key").to_pylist()) == sorted(
        f"s{s}/clip-{c}" for s in range(2) for c in range(3)
    )
    assert json.loads(fs.cat(f"{path}/.ast-label/summary.json"))["files"] == 6

    assert len(labeling_job.gpu_nodes) == 1
    assert labeling_job.stage_nodes["Classify"] == labeling_job.gpu_nodes
    assert labeling_job.stage_nodes["ReadWorkUnitSource"]


@pytest.mark.slow
def test_read_and_fbank_tasks_stay_off_the_gpu_node(labeling_job):
    assert labeling_job.result.returncode == 0
    assert labeling_job.stage_nodes["ReadWorkUnitSource"].isdisjoint(labeling_job.gpu_nodes)


@pytest.mark.slow
def test_failing_job_exits_nonzero_with_its_error_message(cluster, corpus):
    missing = f"{corpus['bucket']}/in/no-such-shard.tar"
    result = submit(
        cluster,
        "run",
        missing,
        "--output",
        f"{corpus['bucket']}/labels-missing",
        "--model",
        corpus["model"],
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert "FAILED" in last_line and "no-such-shard.tar" in last_line, result.stderr[-3000:]


@pytest.mark.slow
def test_submitted_job_shows_its_status_stops_and_carries_no_secrets(cluster, corpus, monkeypatch):
    result = submit(
        cluster,
        "run",
        f"{corpus['bucket']}/in/shard-000000.tar",
        "--output",
        f"{corpus['bucket']}/labels-stopped",
        "--model",
        corpus["model"],
        wait=False,
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert re.fullmatch(r"raysubmit_\w+", job_id)

    # A job takes well over ten seconds to start Python, torch and Ray Data here: still running.
    running = ast_label(cluster, "status", "--address", cluster.dashboard_url, job_id)
    assert running.returncode == 0, running.stderr
    assert running.stdout.splitlines()[0] in (f"{job_id} PENDING", f"{job_id} RUNNING")
    assert "python -m jobs.label" in running.stdout

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_path))
    runtime_env = connect(cluster.dashboard_url).get_job_info(job_id).runtime_env
    assert runtime_env["working_dir"].startswith("gcs://")  # the project, uploaded
    assert "env_vars" not in runtime_env
    text = json.dumps(runtime_env)
    assert cluster.token not in text and "AWS_" not in text and "testing" not in text

    stopped = ast_label(cluster, "stop", "--address", cluster.dashboard_url, job_id)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"{job_id} STOPPED"
    status = ast_label(cluster, "status", "--address", cluster.dashboard_url, job_id)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == f"{job_id} STOPPED"

    unknown = ast_label(cluster, "status", "--address", cluster.dashboard_url, "raysubmit_nope")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (
        f"Error: no job raysubmit_nope on the cluster at {cluster.dashboard_url}"
    )


@pytest.mark.slow
def test_norm_stats_job_equals_direct_computation(cluster, corpus, s3_server):
    stats_uri = f"{corpus['bucket']}/stats/norm.json"
    result = submit(cluster, "norm-stats", f"{corpus['bucket']}/in/*.tar", "--output", stats_uri)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]

    stats = json.loads(s3_server.filesystem().cat(stats_uri.removeprefix("s3://")))
    mean, std, frames = reference_norm_stats(corpus["waveforms"])
    assert stats["frames"] == frames and stats["files"] == 6 and stats["errors"] == 0
    assert stats["mean"] == pytest.approx(mean, abs=1e-5)
    assert stats["std"] == pytest.approx(std, rel=1e-5)


@pytest.mark.slow
def test_without_a_token_or_with_a_wrong_one_the_cluster_refuses_in_one_line(cluster, tmp_path):
    base = cluster.client_env(HOME=str(tmp_path))  # no ~/.ray/auth_token there
    del base["RAY_AUTH_TOKEN_PATH"]
    cases = {
        "requires a token and none was found": base,
        "rejected the token from RAY_AUTH_TOKEN": {**base, "RAY_AUTH_TOKEN": "0" * 64},
    }
    for expected, env in cases.items():
        result = ast_label(
            cluster, "status", "--address", cluster.dashboard_url, "raysubmit_x", env=env
        )
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr


def test_unreachable_address_fails_in_one_line(tmp_path):
    address = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [str(AST_LABEL), "submit", "--address", address, "--", "run", "x", "--output", "y"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: cannot reach the Ray Jobs API at {address}: is the cluster up and its dashboard "
        "port forwarded (ray dashboard cluster.yaml)?"
    )


def test_job_args_become_a_shell_quoted_module_entrypoint():
    entrypoint = job_entrypoint(["run", "s3://b/shard-{000..009}.tar", "--output", "s3://b/o p"])
    assert entrypoint == "python -m jobs.label 's3://b/shard-{000..009}.tar' --output 's3://b/o p'"
    assert job_entrypoint(["norm-stats", "x.tar", "-o", "s.json"]) == (
        "python -m jobs.norm_stats x.tar -o s.json"
    )
    with pytest.raises(CommandError, match="unknown job 'predict'"):
        job_entrypoint(["predict", "a.wav"])


def test_token_is_found_in_rays_order_of_precedence(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    default_file = tmp_path / "home" / ".ray" / "auth_token"
    default_file.parent.mkdir(parents=True)
    default_file.write_text("from-home")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where Path.home() looks

    def found(env: dict[str, str]) -> tuple[str, str] | None:
        token = find_ray_token(env)
        return token and (token.value, token.source)

    both = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert found(both) == ("from-env", "RAY_AUTH_TOKEN")
    assert found({"RAY_AUTH_TOKEN_PATH": str(token_file)}) == ("from-file", str(token_file))
    assert found({}) == ("from-home", str(default_file))
    assert found({**both, "RAY_AUTH_MODE": "disabled"}) is None
    with pytest.raises(ClusterError, match="cannot read the Ray token file"):
        find_ray_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    default_file.unlink()
    assert found({}) is None


def test_working_dir_leaves_big_files_behind_but_keeps_the_bundled_model(tmp_path):
    project = tmp_path / "project"
    for name in ("pyproject.toml", "jobs/label.py", "ast_model/default/config.json"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("")
    for name in ("data/corpus.tar", "ast_model/default/model.safetensors", ".venv/lib/torch.so"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        with open(project / name, "wb") as sparse:  # sparse: no real disk used
            sparse.truncate(BIG_FILE_BYTES + 1)
    notes = []
    runtime_env = job_runtime_env(project, echo=lambda line, err=False: notes.append(line))
    assert runtime_env["working_dir"] == str(project.resolve())
    excludes = runtime_env["excludes"]
    assert "/data/corpus.tar" in excludes and ".venv/" in excludes and ".git/" in excludes
    assert not any("ast_model" in pattern for pattern in excludes)
    assert len(notes) == 1 and notes[0].startswith("not uploading data/corpus.tar (32 MiB)")
