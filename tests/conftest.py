"""Session-wide real components: an S3 server on 127.0.0.1, a local Ray, tiny checkpoints."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import fields
from pathlib import Path

import pytest

# Tests never reach a model hub; everything they load is written by the tests themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_LABELS = ("Silence", "Sine wave", "White noise", "Chirp tone", "Click")


# The slowest modules, longest first. `make test` runs two pytest-xdist workers, one module at a
# time each (--dist loadfile), in collection order: started first, the long ones end together
# instead of one of them running alone at the end.
LONGEST_FIRST = (
    "test_faults.py",
    "test_resume.py",
    "test_cluster.py",
    "test_demo.py",
    "test_relabel.py",
    "test_cli.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: same order within


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class S3Server:
    """A moto standalone server: a real S3 endpoint over HTTP on 127.0.0.1."""

    def __init__(self, endpoint_url: str):
        self.endpoint_url = endpoint_url

    def create_bucket(self, name: str) -> str:
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint_url})
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": self.endpoint_url}, skip_instance_cache=True
        )


@pytest.fixture(scope="session")
def s3_server():
    """Starts moto's S3 server on a free loopback port and points the AWS variables at it.

    The variables are set before any Ray starts, so Ray workers inherit them exactly as they would
    inherit a real deployment's AWS settings.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_http(endpoint)
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=endpoint,
        )
        yield S3Server(endpoint)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One real local Ray for the test session (started after the S3 variables are set)."""
    import ray

    # address="local": never join a cluster that another test (or `ray start`) left on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def write_hf_checkpoint(directory: Path, labels=TINY_LABELS, **config_overrides) -> Path:
    """Writes a randomly initialised AST checkpoint with transformers' own save_pretrained:
    ast_model's TINY_CONFIG unless config_overrides say otherwise."""
    import torch
    from transformers import ASTConfig, ASTForAudioClassification

    from ast_model.config import TINY_CONFIG

    settings = {f.name: getattr(TINY_CONFIG, f.name) for f in fields(TINY_CONFIG)}
    del settings["id2label"]
    settings.update(config_overrides)
    config = ASTConfig(
        **settings,
        id2label={i: name for i, name in enumerate(labels)},
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(0)
    model = ASTForAudioClassification(config).eval()
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory) -> Path:
    """A tiny AST (hidden 32, 2 layers, strides 16) in Hugging Face format, 5 labels."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny-ast"))
