"""cluster.yaml: valid for Ray's own cluster launcher, and the deployment rules hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture(scope="module")
def raw_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def config(raw_config) -> dict:
    """The config as `ray up` sees it: merged with Ray's AWS defaults, then schema-validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(raw_config)
    validate_config(prepared)  # ray-schema.json shipped in the ray package, plus Ray's own checks
    return prepared


def _node_types(config: dict) -> dict[str, dict]:
    return config["available_node_types"]


def _workers(config: dict) -> dict[str, dict]:
    return {name: t for name, t in _node_types(config).items() if name != config["head_node_type"]}


def test_config_passes_rays_schema_and_checks(config):
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in _node_types(config)


def test_head_runs_no_tasks_and_has_no_gpu(config):
    head = _node_types(config)[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    start = " ".join(config["head_start_ray_commands"])
    assert "--num-gpus=0" in start and "--num-cpus=0" in start


def test_one_gpu_worker_type_and_one_cpu_worker_type_autoscale(config):
    workers = _workers(config)
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if t["resources"].get("GPU", 0) == 0]
    assert len(gpu) == 1 and len(cpu) == 1
    assert re.match(r"^(g4dn|g5|g6|g6e|p4d|p5)\.", gpu[0]["node_config"]["InstanceType"])
    assert cpu[0]["resources"]["CPU"] >= 4
    for node_type in workers.values():
        assert node_type["max_workers"] > node_type.get("min_workers", 0)
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]


def test_every_node_has_its_own_least_privilege_instance_profile(config):
    for name, node_type in _node_types(config).items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        arn = profile.get("Arn", "")
        # Naming a profile stops Ray from creating ray-autoscaler-v1 (EC2 and S3 full access).
        assert re.match(r"^arn:aws:iam::\d{12}:instance-profile/", arn), name
        assert "ray-autoscaler" not in arn
        assert node_type["node_config"]["MetadataOptions"]["HttpTokens"] == "required"


def test_dashboard_stays_private_and_token_auth_is_on(raw_config):
    head_start = " ".join(raw_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--dashboard-host=0.0.0.0" not in CLUSTER_YAML.read_text()
    for command in raw_config["head_start_ray_commands"] + raw_config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command
    assert raw_config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_setup_installs_the_synced_project(raw_config):
    assert raw_config["file_mounts"]["~/ast-label"] == "."
    assert any("pip install" in c and "~/ast-label" in c for c in raw_config["setup_commands"])
    assert ".gitignore" in raw_config["rsync_filter"]


def test_no_credentials_in_the_file():
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"(?i)aws_secret_access_key|aws_session_token|RAY_AUTH_TOKEN=", text)
