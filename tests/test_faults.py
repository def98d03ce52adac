"""Faults of the store, injected by tests/fault_proxy.py in front of the S3 server, against the real
`ast-label run` (a subprocess whose S3 traffic, Ray workers' included, goes through the proxy).
The runs join one Ray kept for this module (`ray start --head`, started with the proxy's endpoint,
as `run --address` joins a Ray kept running on a machine): each run pays for its own driver and
workers, not for starting Ray again.

The contract (DESIGN.md, "Bad input, and faults that are not the data's"): a fault of the store
never becomes an error row; one the retries absorb changes nothing in the output; one that
outlasts them leaves its unit uncommitted (nothing partial visible to readers), the run ends with
exit status 3 naming the unit and why, and the same command run again labels exactly that unit.
An output that cannot be written fails before Ray starts, in one line.

Retries are shortened through AST_LABEL_IO_ATTEMPTS / AST_LABEL_IO_DELAY_S (pipeline.storage's
RetryPolicy), AST_LABEL_S3_ATTEMPTS (the client's own retries) and AST_LABEL_S3_TIMEOUT_S, so a
storm outlasts them in seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import botocore.exceptions
import numpy as np
import pyarrow.dataset as pads
import pytest
from audio_corpus import encode, sine, tar_bytes
from conftest import free_port
from fault_proxy import FaultProxy, FaultRule
from ray_cluster import start_local_head

from ast_model.config import FbankConfig
from pipeline import rows as R
from pipeline.labeling import members
from pipeline.labeling.plan import WorkUnit, tar_unit_id
from pipeline.labeling.read import ReadStage
from pipeline.settings import FeatureSettings, ReadSettings
from pipeline.storage import (
    RetryingReader,
    RetryPolicy,
    StorageError,
    filesystem_for,
    put_file,
    with_retries,
)

AST_LABEL = Path(sys.executable).with_name("ast-label")
INPUTS = "fault-inputs"
OUTPUTS = "fault-outputs"
SHARDS = 8
CLIPS_PER_SHARD = 2
INPUT_GLOB = f"s3://{INPUTS}/shards/*.tar"  # planning LISTs the folder: LIST faults count too
SECRET = "fault-test-secret-value-0123456789"  # moto takes any key; no message may show it
# Retries cut short, so that a storm outlasts them in seconds (see pipeline.storage), yet enough
# of them (3 x 3 tries) that faults at a few percent never outlast them. The module's Ray and
# every command share them: Ray's workers take their environment from the Ray they run in.
S3_TIMEOUT_S = 3.0
QUICK_RETRIES = {
    "AST_LABEL_IO_ATTEMPTS": "3",
    "AST_LABEL_IO_DELAY_S": "0.1",
    "AST_LABEL_S3_ATTEMPTS": "3",
    "AST_LABEL_S3_TIMEOUT_S": str(S3_TIMEOUT_S),
}
# For the commands that must fail before Ray: nothing listens there, so one that got as far as
# joining Ray would fail on that instead, with another message.
NO_RAY = "127.0.0.1:1"
SCORE_TOLERANCE = 1e-5  # the same model on the same windows; batches may be grouped differently
MiB = 2**20


def shard_uri(index: int) -> str:
    return f"s3://{INPUTS}/shards/shard-{index:06d}.tar"


def unit_id(index: int) -> str:
    return tar_unit_id(shard_uri(index))


# --- the store, the proxy, the corpus ----------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint_url, seed=11) as running:
        yield running


@pytest.fixture(scope="module")
def module_ray(proxy):
    """The Ray the module's runs join: its workers talk to the store through the proxy."""
    env = {**os.environ, **proxy.environ(), **QUICK_RETRIES, "AWS_SECRET_ACCESS_KEY": SECRET}
    ray = start_local_head(env)
    yield ray.gcs_address
    ray.stop()


@pytest.fixture(autouse=True)
def quiet_proxy(proxy):
    """Every test starts and ends with a proxy that passes everything through."""
    proxy.reset(seed=11)
    yield
    proxy.reset()


@pytest.fixture(scope="module")
def store(s3_server):
    """moto's S3 directly (not through the proxy), with the corpus and an output bucket."""
    s3_server.create_bucket(INPUTS)
    s3_server.create_bucket(OUTPUTS)
    fs = s3_server.filesystem()
    for shard in range(SHARDS):
        entries = []
        for clip in range(CLIPS_PER_SHARD):
            seconds = 12.0 if (shard + clip) % 3 == 0 else 1.5  # some clips have two windows
            wave = sine(seconds, sr=16_000, freq=220.0 + 60 * shard + 15 * clip)
            entries.append((f"clip-{clip}.flac", encode(wave, 16_000, "flac")))
        fs.pipe_file(shard_uri(shard).removeprefix("s3://"), tar_bytes(entries))
    return fs


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float


def ast_label(proxy: FaultProxy, ray_address: str, *arguments: str) -> Run:
    env = {
        **os.environ,
        **proxy.environ(),  # this process talks to moto directly; the command, to the proxy
        **QUICK_RETRIES,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "RAY_ADDRESS": ray_address,
    }
    started = time.monotonic()
    result = subprocess.run(
        [str(AST_LABEL), *arguments], env=env, capture_output=True, text=True, timeout=300
    )
    return Run(result.returncode, result.stdout, result.stderr, time.monotonic() - started)


def label(proxy: FaultProxy, ray_address: str, output: str, model: Path) -> Run:
    return ast_label(
        proxy, ray_address, "run", INPUT_GLOB, "--output", output, "--model", str(model),
        "--batch-size", "4",
    )  # fmt: skip


@dataclass(frozen=True)
class Row:
    start_s: float
    end_s: float
    error: str | None
    scores: tuple[float, ...] | None


def output_rows(store, output: str) -> dict[tuple[str, str, int], Row]:
    """What a reader of OUT sees (pyarrow.dataset skips the hidden .ast-label folder), keyed by
    (shard, key, window_index); a row seen twice fails here."""
    root = output.removeprefix("s3://")
    store.invalidate_cache()  # other processes wrote there
    if not store.exists(root):
        return {}
    columns = ["shard", "key", "window_index", "start_s", "end_s", "scores", "error"]
    table = pads.dataset(root, filesystem=store, format="parquet").to_table(columns=columns)
    rows: dict[tuple[str, str, int], Row] = {}
    for row in table.to_pylist():
        where = (row["shard"], row["key"], row["window_index"])
        assert where not in rows, f"row {where} seen twice"
        scores = None if row["scores"] is None else tuple(row["scores"])
        rows[where] = Row(row["start_s"], row["end_s"], row["error"], scores)
    return rows


def assert_same_rows(rows: dict, reference: dict) -> None:
    assert sorted(rows) == sorted(reference)
    for where, row in rows.items():
        expected = reference[where]
        assert (row.start_s, row.end_s, row.error) == (
            expected.start_s,
            expected.end_s,
            expected.error,
        ), where
        assert (row.scores is None) == (expected.scores is None), where
        if row.scores is not None:
            np.testing.assert_allclose(row.scores, expected.scores, atol=SCORE_TOLERANCE)


def rows_of_shard(rows: dict, index: int) -> dict:
    return {where: row for where, row in rows.items() if where[0] == shard_uri(index)}


def markers(store, output: str) -> set[str]:
    folder = f"{output.removeprefix('s3://')}/.ast-label/commits"
    store.invalidate_cache()
    if not store.exists(folder):
        return set()
    return {Path(name).stem for name in store.ls(folder, refresh=True) if name.endswith(".json")}


def final_files(store, output: str) -> set[str]:
    store.invalidate_cache()
    return {Path(name).stem for name in store.glob(f"{output.removeprefix('s3://')}/*.parquet")}


def summary_json(store, output: str) -> dict:
    return json.loads(store.cat_file(f"{output.removeprefix('s3://')}/.ast-label/summary.json"))


# --- a clean run: the reference ----------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_run(proxy, module_ray, store, tiny_hf_checkpoint):
    proxy.reset()
    output = f"s3://{OUTPUTS}/clean"
    run = label(proxy, module_ray, output, tiny_hf_checkpoint)
    counts = proxy.counts()
    proxy.reset()
    return run, output, counts


@pytest.fixture(scope="module")
def reference(clean_run, store) -> dict:
    run, output, _ = clean_run
    assert run.returncode == 0, run.stderr[-3000:]
    return output_rows(store, output)


@pytest.mark.slow
def test_a_clean_run_through_the_proxy_commits_every_unit(clean_run, reference, store):
    run, output, counts = clean_run
    assert run.returncode == 0, run.stderr[-3000:]
    assert markers(store, output) == {unit_id(i) for i in range(SHARDS)}
    assert final_files(store, output) == markers(store, output)
    files = {(shard, key) for shard, key, _ in reference}
    assert len(files) == SHARDS * CLIPS_PER_SHARD
    assert all(row.error is None for row in reference.values())
    assert len(reference) > len(files)  # some clips have two windows
    # Everything went through the proxy, and none of it was touched.
    for method in ("GET", "HEAD", "PUT", "POST", "DELETE"):
        assert counts[f"requests:{method}"] > 0, method
    assert sum(counts[kind] for kind in ("error", "storm", "drop", "delay", "refused")) == 0


# --- faults that the retries absorb ------------------------------------------------------------


@pytest.mark.slow
def test_faults_at_a_few_percent_on_every_request_leave_the_output_equal_to_a_clean_run(
    proxy, module_ray, store, reference, tiny_hf_checkpoint
):
    timeout_s = S3_TIMEOUT_S  # the module's Ray's, and every command's
    # Each kind of fault on each kind of request at least once, whatever the dice say: shard
    # reads (ranged GETs), LISTs, HEADs, PUTs, POSTs (bulk deletes), DELETEs. (A run's files are
    # far below the multipart threshold: multipart uploads are tested below, without Ray.)
    kinds = {
        "ranged GET": {"methods": "GET", "path": r"/shards/"},
        "LIST": {"methods": "GET", "query": "list-type"},
        "HEAD": {"methods": "HEAD"},
        "PUT": {"methods": "PUT"},
        "POST": {"methods": "POST"},
        "DELETE": {"methods": "DELETE"},
    }
    once = []
    for where in kinds.values():
        once += [
            FaultRule(**where, error_rate=1.0, error_status=500, max_faults=1),
            FaultRule(**where, error_rate=1.0, error_status=503, max_faults=1),
            FaultRule(**where, drop_rate=1.0, max_faults=1),
        ]
    # Answers held past the client's read timeout: a PUT that was done, a read of a shard.
    for where in (kinds["PUT"], kinds["ranged GET"]):
        once.append(FaultRule(**where, delay_rate=1.0, delay_s=timeout_s + 1, max_faults=1))
    background = [
        FaultRule(error_rate=0.02, error_status=500),
        FaultRule(error_rate=0.02, error_status=503),
        FaultRule(drop_rate=0.03),  # mid-body when the answer has one, before the status if not
        FaultRule(delay_rate=0.05, delay_s=0.3),
    ]
    proxy.set_rules(once + background)
    output = f"s3://{OUTPUTS}/few-percent"
    run = label(proxy, module_ray, output, tiny_hf_checkpoint)

    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_rows(output_rows(store, output), reference)  # each file's rows, exactly once
    assert markers(store, output) == {unit_id(i) for i in range(SHARDS)}
    requests, faults = proxy.request_log(), proxy.fault_log()
    injected = {(event.kind, request_kind(requests[event.request])) for event in faults}
    for kind in kinds:
        assert {("error", kind), ("drop", kind)} <= injected, kind
    assert {("delay", "PUT"), ("delay", "ranged GET")} <= injected
    assert {500, 503} == {event.status for event in faults if event.kind == "error"}
    assert len(faults) > len(once)  # the dice struck too, not only the faults sure to happen


def request_kind(request) -> str:
    if request.method == "GET" and "list-type" in request.query:
        return "LIST"
    if request.method == "GET" and request.range:
        return "ranged GET"
    return request.method


# --- faults that outlast the retries: one run with six of them, then a plain rerun ---------------

# Units 0 and 7 meet no fault. The others:
READ_STORM = 1  # every GET of the shard answered 503 SlowDown
DELETED = 2  # listed at planning, then 404 NoSuchKey
FORBIDDEN = 3  # listed at planning, then 403 AccessDenied
STAGING_STORM = 4  # every PUT of its staged parts answered 500
FINAL_LOST = 5  # its final file is written, but every answer to the PUT is lost
MARKER_STORM = 6  # final file written; every PUT of its commit marker answered 500
STRUCK = (READ_STORM, DELETED, FORBIDDEN, STAGING_STORM, FINAL_LOST, MARKER_STORM)
UNTOUCHED = (0, 7)


@dataclass
class StormRuns:
    output: str
    first: Run
    rows_after_first: dict
    markers_after_first: set[str]
    finals_after_first: set[str]
    summary_after_first: dict
    faults: dict[str, int]
    second: Run
    rows_after_second: dict
    staging_after_second: list[str]


@pytest.fixture(scope="module")
def storm_runs(proxy, module_ray, store, tiny_hf_checkpoint) -> StormRuns:
    output = f"s3://{OUTPUTS}/storms"
    out = re.escape(f"/{OUTPUTS}/storms")
    proxy.reset(seed=3)
    proxy.start_storm(rf"/shards/shard-{READ_STORM:06d}\.tar$", methods="GET", status=503)
    # The glob's LIST at planning names them; every request for them after that is refused.
    proxy.refuse(rf"/shards/shard-{DELETED:06d}\.tar$", status=404)
    proxy.refuse(rf"/shards/shard-{FORBIDDEN:06d}\.tar$", status=403)
    proxy.set_rules(
        [
            FaultRule(
                path=rf"{out}/\.ast-label/staging/{re.escape(unit_id(STAGING_STORM))}/",
                methods="PUT",
                error_rate=1.0,
            ),
            FaultRule(
                path=rf"{out}/{re.escape(unit_id(FINAL_LOST))}\.parquet$",
                methods="PUT",
                drop_rate=1.0,
            ),
            FaultRule(
                path=rf"{out}/\.ast-label/commits/{re.escape(unit_id(MARKER_STORM))}\.json$",
                methods="PUT",
                error_rate=1.0,
            ),
        ]
    )
    first = label(proxy, module_ray, output, tiny_hf_checkpoint)
    faults = proxy.counts()
    state = (
        output_rows(store, output),
        markers(store, output),
        final_files(store, output),
        summary_json(store, output),
    )
    proxy.reset()  # the storms are over

    second = label(proxy, module_ray, output, tiny_hf_checkpoint)
    staging = store.find(f"{output.removeprefix('s3://')}/.ast-label/staging")
    return StormRuns(output, first, *state, faults, second, output_rows(store, output), staging)


@pytest.mark.slow
def test_a_read_storm_outlasting_the_retries_leaves_its_shard_uncommitted(storm_runs):
    runs = storm_runs
    assert runs.first.returncode == 3, runs.first.stderr[-3000:]
    assert runs.faults["storm"] > 0
    unit = unit_id(READ_STORM)
    # The summary names the unit and why; the last line says what to do.
    line = next(line for line in runs.first.stdout.splitlines() if line.strip().startswith(unit))
    assert "please reduce your request rate" in line.lower(), line
    assert f"{len(STRUCK)} work units did not commit" in runs.first.stderr.splitlines()[-1]
    assert "run the same command again" in runs.first.stderr.splitlines()[-1]
    assert "Traceback" not in runs.first.stderr
    # Nothing of it is committed or visible, and no error row stands in for it.
    assert unit not in runs.markers_after_first and unit not in runs.finals_after_first
    assert rows_of_shard(runs.rows_after_first, READ_STORM) == {}
    assert all(row.error is None for row in runs.rows_after_first.values())
    assert unit in runs.summary_after_first["units_failed"]
    assert SECRET not in runs.first.stdout + runs.first.stderr


@pytest.mark.slow
def test_shards_deleted_or_forbidden_after_planning_are_not_committed(storm_runs):
    runs = storm_runs
    assert runs.first.returncode == 3
    assert runs.faults["refused"] >= 2
    failed = runs.summary_after_first["units_failed"]
    assert f"{shard_uri(DELETED)}: not found" in failed[unit_id(DELETED)], failed
    assert f"{shard_uri(FORBIDDEN)}: access denied" in failed[unit_id(FORBIDDEN)], failed
    for shard in (DELETED, FORBIDDEN):
        assert unit_id(shard) not in runs.markers_after_first | runs.finals_after_first
        assert rows_of_shard(runs.rows_after_first, shard) == {}


@pytest.mark.slow
def test_an_output_write_storm_never_commits_a_unit_with_missing_rows(storm_runs, reference):
    runs = storm_runs
    assert runs.first.returncode == 3
    failed = runs.summary_after_first["units_failed"]
    assert set(failed) == {unit_id(shard) for shard in STRUCK}, failed
    assert "staging write failed" in failed[unit_id(STAGING_STORM)], failed
    assert f"{unit_id(FINAL_LOST)}.parquet" in failed[unit_id(FINAL_LOST)], failed
    assert "ConnectionClosedError" in failed[unit_id(FINAL_LOST)], failed
    assert f"commits/{unit_id(MARKER_STORM)}.json" in failed[unit_id(MARKER_STORM)], failed
    # Committed: exactly the units that met no fault, each with all of its rows.
    assert runs.markers_after_first == {unit_id(shard) for shard in UNTOUCHED}
    for shard in UNTOUCHED:
        assert_same_rows(
            rows_of_shard(runs.rows_after_first, shard), rows_of_shard(reference, shard)
        )
    # A final file written before its commit failed (its PUT's answer lost, or its marker's PUT
    # failing) is taken away again: readers see no rows of a unit reported as not committed.
    assert runs.finals_after_first == runs.markers_after_first
    for shard in range(SHARDS):
        seen = rows_of_shard(runs.rows_after_first, shard)
        if seen:
            assert_same_rows(seen, rows_of_shard(reference, shard))


@pytest.mark.slow
def test_a_plain_rerun_after_the_storms_labels_exactly_the_units_that_did_not_commit(
    storm_runs, reference
):
    runs = storm_runs
    assert runs.second.returncode == 0, runs.second.stderr[-3000:]
    committed, todo = len(UNTOUCHED), len(STRUCK)
    said = f"{SHARDS} tar shards: {committed} labeled already, {todo} new ({todo} work units"
    assert said in runs.second.stderr
    assert f"done: {todo * CLIPS_PER_SHARD} files labeled in " in runs.second.stdout
    assert_same_rows(runs.rows_after_second, reference)
    assert runs.staging_after_second == []


# --- an output that cannot take the results fails before Ray starts ------------------------------


@pytest.mark.parametrize("case", ["missing bucket", "access denied", "a file"])
def test_an_unusable_output_fails_before_ray_in_one_line(
    case, proxy, store, tiny_hf_checkpoint, tmp_path
):
    if case == "missing bucket":
        output, expected = "s3://no-such-bucket-for-faults/out", "the bucket does not exist"
    elif case == "access denied":
        output, expected = f"s3://{OUTPUTS}/read-only", "access denied"
        proxy.refuse(rf"^/{OUTPUTS}/read-only/", methods=["PUT", "POST"], status=403)
    else:
        output, expected = str(tmp_path / "labels.parquet"), "is a file, not a folder"
        Path(output).write_bytes(b"not a folder")

    model = str(tiny_hf_checkpoint)
    run = ast_label(proxy, NO_RAY, "run", shard_uri(0), "--output", output, "--model", model)

    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stdout == ""
    assert run.stderr.startswith("Error: ") and run.stderr.count("\n") == 1, run.stderr
    assert expected in run.stderr and output in run.stderr
    assert SECRET not in run.stderr
    # No retries of a missing bucket or a denied write: one PUT (or none), in a few seconds
    # (most of them go to starting Python and checking the model's files).
    assert proxy.requests_seen("PUT") <= 1
    assert run.wall_s < 30, run.wall_s


# --- the storage layer alone: with_retries and RetryingReader against the proxy ------------------


@pytest.fixture
def proxied(proxy, store, monkeypatch):
    """pipeline.storage's own S3 client, through the proxy, with one attempt per client layer:
    what is left to retry is left to with_retries and RetryingReader."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AST_LABEL_S3_ATTEMPTS", "1")
    monkeypatch.setenv("AST_LABEL_S3_TIMEOUT_S", "1")
    monkeypatch.setenv("AST_LABEL_IO_ATTEMPTS", "3")
    monkeypatch.setenv("AST_LABEL_IO_DELAY_S", "0.01")
    fs, _ = filesystem_for(f"s3://{OUTPUTS}/")
    return fs


def put_object(store, key: str, size: int, seed: int = 0) -> tuple[str, bytes]:
    data = np.random.default_rng(seed).bytes(size)
    path = f"{OUTPUTS}/objects/{key}"
    store.pipe_file(path, data)
    return path, data


def test_a_read_cut_mid_stream_resumes_at_its_offset(proxy, store, proxied):
    path, data = put_object(store, "cut-mid-stream", 2 * MiB)
    proxy.set_rules([FaultRule(path=f"/{path}$", methods="GET", drop_rate=0.4)])
    policy = RetryPolicy(attempts=10, first_delay_s=0.01)
    block = 64 * 1024

    # Reads of one block each: every GET then starts where the reader stands.
    with RetryingReader(proxied, path, block_size=block, policy=policy) as reader:
        chunks = list(iter(lambda: reader.read(block), b""))

    assert b"".join(chunks) == data
    requests = proxy.request_log()
    drops = proxy.fault_log("drop")
    assert len(drops) >= 3
    for drop in drops:
        # The cut read is taken up by a fresh request from the very byte it had asked for.
        cut = requests[drop.request]
        retry = next(r for r in requests[drop.request + 1 :] if r.method == "GET")
        assert range_start(retry) == range_start(cut), (cut, retry)
    starts = [range_start(r) for r in requests if r.method == "GET"]
    assert len(starts) == len(set(starts)) + len(drops)  # nothing asked for again, but the cuts


def range_start(record) -> int:
    return int(re.fullmatch(r"bytes=(\d+)-\d+", record.range).group(1))


def test_retries_are_bounded_and_back_off(proxy, store, proxied):
    path, _ = put_object(store, "stormy", 1000)
    proxy.start_storm(f"/{path}$", status=500)
    policy = RetryPolicy(attempts=4, first_delay_s=0.2, max_delay_s=0.3)

    started = time.monotonic()
    with pytest.raises(StorageError, match=r"^cannot read stormy: OSError: .*internal error"):
        with_retries(lambda: proxied.cat_file(path, start=0, end=10), "cannot read stormy", policy)
    elapsed = time.monotonic() - started

    times = [record.time for record in proxy.request_log()]
    assert len(times) == 4  # attempts, each one request (the client's own retries are off here)
    caps = [0.2, 0.3, 0.3]  # full jitter: each pause in [0, min(max, first * 2**n)]
    for gap, cap in zip(np.diff(times), caps, strict=True):
        assert gap <= cap + 0.5, (gap, cap)
    assert elapsed < sum(caps) + 3.0
    # The environment's policy: AST_LABEL_IO_ATTEMPTS=3 tries.
    proxy.reset()
    proxy.start_storm(f"/{path}$", status=503)
    with pytest.raises(StorageError, match="reduce your request rate"):
        with_retries(lambda: proxied.cat_file(path, start=0, end=10), "cannot read stormy")
    assert proxy.requests_seen() == 3
    # The pauses grow: up to 1, 2, 4, 8, 16 s by default, never beyond max_delay_s.
    default = RetryPolicy()
    for attempt, cap in enumerate([1, 2, 4, 8, 16, 16]):
        pauses = [default.delay_s(attempt) for _ in range(400)]
        assert 0 <= min(pauses) and max(pauses) <= cap
        assert max(pauses) > 0.9 * cap


@pytest.mark.parametrize("status, reason", [(404, "not found"), (403, "access denied")])
def test_a_missing_or_forbidden_object_is_not_retried(proxy, store, proxied, status, reason):
    path, _ = put_object(store, f"refused-{status}", 1000)
    proxy.refuse(f"/{path}$", status=status)

    with pytest.raises(StorageError, match=f"cannot read .*: {reason}"):
        with_retries(lambda: proxied.cat_file(path, start=0, end=10), f"cannot read {path}")
    assert proxy.requests_seen() == 1

    proxy.reset()
    proxy.refuse(f"/{path}$", status=status)
    with pytest.raises(StorageError, match=f"cannot open .*: {reason}"):
        RetryingReader(proxied, path, block_size=1024)
    assert proxy.requests_seen("HEAD") == 1


@pytest.mark.parametrize(
    "fault, cause",
    [
        ("dropped GET body", aiohttp.ClientPayloadError),
        ("dropped PUT answer", botocore.exceptions.ConnectionClosedError),
        ("read timeout", botocore.exceptions.ReadTimeoutError),
        ("store unreachable", botocore.exceptions.EndpointConnectionError),
    ],
)
def test_faults_that_are_not_oserrors_end_as_storage_errors(
    proxy, store, proxied, monkeypatch, fault, cause
):
    path, data = put_object(store, "kinds", 100_000)
    fs = proxied
    if fault == "dropped GET body":
        proxy.set_rules([FaultRule(methods="GET", drop_rate=1.0)])
    elif fault == "dropped PUT answer":
        proxy.set_rules([FaultRule(methods="PUT", drop_rate=1.0)])
    elif fault == "read timeout":
        monkeypatch.setenv("AST_LABEL_S3_TIMEOUT_S", "0.5")
        fs, _ = filesystem_for(f"s3://{OUTPUTS}/")
        proxy.set_rules([FaultRule(methods="GET", delay_rate=1.0, delay_s=1.0)])
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        fs, _ = filesystem_for(f"s3://{OUTPUTS}/")
    if fault == "dropped PUT answer":
        call = lambda: fs.pipe_file(path, data[::-1])  # noqa: E731
    else:
        call = lambda: fs.cat_file(path, start=0, end=len(data))  # noqa: E731

    with pytest.raises(StorageError) as raised:
        with_retries(call, f"cannot use {path}")
    assert isinstance(raised.value.__cause__, cause), repr(raised.value.__cause__)
    assert type(raised.value.__cause__).__name__ in str(raised.value)
    if fault == "dropped PUT answer":  # the write was done; the client never heard so
        assert store.cat_file(path) == data[::-1]
    if fault in ("dropped GET body", "read timeout"):
        with pytest.raises(StorageError):
            with RetryingReader(fs, path, block_size=64 * 1024) as reader:
                while reader.read(50_000):
                    pass


def test_a_lost_answer_to_a_multipart_completion_is_written_again(proxy, store, proxied):
    """The object is written but the client's retry of the completion finds the upload gone
    (FileNotFoundError, NoSuchUpload): the write is retried whole, never taken for a missing
    object nor left as a failed write."""
    data = np.random.default_rng(5).bytes(17 * MiB)  # over two 8 MiB parts: a multipart upload
    path = f"{OUTPUTS}/objects/multipart.parquet"
    proxy.set_rules(
        [
            FaultRule(methods="POST", query=r"^uploadId=", drop_rate=1.0, max_faults=1),
            FaultRule(methods="PUT", query=r"partNumber=", error_rate=1.0, max_faults=1),
        ]
    )

    put_file(proxied, path, data)

    assert store.cat_file(path) == data
    assert proxy.faults_injected("drop", "POST") == 1
    assert proxy.faults_injected("error", "PUT") == 1
    assert proxy.requests_seen("POST") >= 4  # create + complete, twice


def test_a_storm_partway_through_a_shard_ends_its_unit_with_a_failure_row(
    proxy, store, proxied, monkeypatch
):
    """Rows already read stay rows; the storm adds no error row, only the unit's failure."""
    monkeypatch.setattr(members, "_STREAM_BLOCK_BYTES", 64 * 1024)  # many ranged GETs per shard
    entries = [
        (f"clip-{i}.wav", encode(sine(3.0, sr=16_000, freq=300.0 + 50 * i), 16_000, "wav"))
        for i in range(6)
    ]
    path = f"{OUTPUTS}/objects/partway.tar"
    store.pipe_file(path, tar_bytes(entries))
    unit = WorkUnit(tar_unit_id(f"s3://{path}"), "tar", (f"s3://{path}",))
    read = ReadSettings(window_s=10.24, hop_s=10.24, max_duration_s=60.0, max_member_bytes=MiB)
    stage = ReadStage(read, FeatureSettings(FbankConfig(), "float32", 4))

    rows = []
    for row, _ in stage.unit_rows(unit):
        rows.append(row)
        if len(rows) == 1:
            proxy.start_storm(f"/{path}$", methods="GET", status=503)

    labeled, failure = rows[:-1], rows[-1]
    assert 1 <= len(labeled) < len(entries)
    assert all(not row[R.ERROR] and not row[R.UNIT_FAILURE] for row in labeled)
    assert failure[R.UNIT_FAILURE].startswith(f"cannot read s3://{path} at byte ")
    assert "reduce your request rate" in failure[R.UNIT_FAILURE]
    assert not failure[R.ERROR]


def test_an_object_replaced_while_being_read_is_a_storage_fault_not_spliced_bytes(
    proxy, store, proxied
):
    path, first = put_object(store, "replaced", 512 * 1024, seed=1)
    block = 64 * 1024
    with RetryingReader(proxied, path, block_size=block) as reader:
        head = reader.read(block)
        store.pipe_file(path, np.random.default_rng(2).bytes(len(first)))  # same size, new ETag
        with pytest.raises(StorageError, match="replaced while being read") as raised:
            while reader.read(block):
                pass
    assert head == first[:block]
    assert "at byte" in str(raised.value)


# --- faults around planning and the output's listing, before Ray ---------------------------------


def test_a_burst_of_5xx_at_planning_shorter_than_the_retries_does_not_stop_the_run(
    proxy, store, tiny_hf_checkpoint
):
    # Four 500s outlast the client's own three attempts, not with_retries' 3 x 3.
    proxy.start_storm(rf"^/{INPUTS}/?$", methods="GET", query="list-type", status=500,
                      max_failures=4)  # fmt: skip
    output = "s3://no-such-bucket-for-faults/out"

    run = ast_label(
        proxy, NO_RAY, "run", INPUT_GLOB, "--output", output, "--model", str(tiny_hf_checkpoint)
    )

    assert proxy.faults_injected("storm") == 4
    # Planning got through; the run stops at the next check, before Ray: the missing bucket.
    assert run.returncode == 2 and "the bucket does not exist" in run.stderr, run.stderr


def test_a_storm_on_the_outputs_listing_before_ray_ends_in_one_line(
    proxy, store, tiny_hf_checkpoint
):
    output = f"s3://{OUTPUTS}/listing-storm"
    proxy.start_storm(rf"^/{OUTPUTS}/?$", methods="GET", query="prefix=listing-storm", status=500)

    model = str(tiny_hf_checkpoint)
    run = ast_label(proxy, NO_RAY, "run", shard_uri(0), "--output", output, "--model", model)

    assert proxy.faults_injected("storm") > 0
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith("Error: ") and run.stderr.count("\n") == 1, run.stderr
    assert run.returncode in (2, 3)  # not 1, the status of a bug
