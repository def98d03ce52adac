"""Output: schema, staging parts, per-unit commit, resume rules; on a local folder and moto S3."""

from __future__ import annotations

import json
import time
import uuid

import duckdb
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.errors import UserError
from pipeline.output import index as output_index
from pipeline.output.commit import CommittedUnit, StagedUnit, StagingLedger, commit_unit
from pipeline.output.index import read_commit_markers, write_index
from pipeline.output.layout import OutputError, OutputLocation, write_summary
from pipeline.output.resume import check_resume
from pipeline.output.schema import OutputSpec, output_schema, rows_to_table
from pipeline.output.staging import write_staging_parts
from pipeline.storage import StorageError

HIDDEN = 8
LABELS = ("Silence", "Sine wave", "White noise", "Chirp tone", "Click")
TOP_K = 3
WINDOW_S = 10.24


def make_spec(
    output_uri: str, run_id: str = "run1", hidden: int = HIDDEN, **metadata
) -> OutputSpec:
    file_metadata = {
        "model": "tiny",
        "weights_sha256": "ab" * 32,
        "label_names": list(LABELS),
        "features": {"num_mel_bins": 128, "max_length": 1024},
        "window_s": WINDOW_S,
        "hop_s": WINDOW_S,
        "package_version": "0.1.0",
        **metadata,
    }
    return OutputSpec(OutputLocation.of(output_uri), run_id, hidden, len(LABELS), file_metadata)


def at(uri: str) -> OutputLocation:
    return OutputLocation.of(uri)


def commit(spec: OutputSpec, unit_id: str, sources, part_uris, rows: int) -> dict:
    return commit_unit(spec, StagedUnit(unit_id, tuple(part_uris), rows), sources)


def unit_batch(
    unit_id: str,
    windows_per_key: dict[str, int],
    error_keys=(),
    hidden: int = HIDDEN,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """All rows of one unit, shaped as the classify stage emits them: (B, D) vectors with zeros on
    error rows, top-k label ids; the unit's total rides on its last row."""
    rng = np.random.default_rng(seed)
    rows = [(key, w, None) for key, count in windows_per_key.items() for w in range(count)]
    rows += [(key, 0, f"cannot decode {key}") for key in error_keys]
    count = len(rows)
    failed = np.array([error is not None for _, _, error in rows])
    embedding = rng.standard_normal((count, hidden)).astype(np.float32)
    scores = rng.random((count, len(LABELS))).astype(np.float32)
    embedding[failed] = 0.0
    scores[failed] = 0.0
    top_index = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_K].astype(np.int32)
    durations = {key: WINDOW_S * (n - 0.5) for key, n in windows_per_key.items()}
    unit_rows = np.zeros(count, dtype=np.int32)
    unit_rows[-1] = count
    return {
        "unit_id": np.array([unit_id] * count, dtype=object),
        "unit_rows": unit_rows,
        "shard": np.array([f"s3://in/{unit_id}.tar"] * count, dtype=object),
        "key": np.array([key for key, _, _ in rows], dtype=object),
        "window_index": np.array([w for _, w, _ in rows], dtype=np.int32),
        "start_s": np.array([w * WINDOW_S for _, w, _ in rows]),
        "end_s": np.array([(w + 1) * WINDOW_S for _, w, _ in rows]),
        "duration_s": np.array([0.0 if e else durations[k] for k, _, e in rows]),
        "sample_rate": np.array([0 if e else 44100 for _, _, e in rows], dtype=np.int32),
        "embedding": embedding,
        "scores": scores,
        "top_index": top_index,
        "metadata": np.array([json.dumps({"k": k}) for k, _, _ in rows], dtype=object),
        "error": np.array([e for _, _, e in rows], dtype=object),
        "unit_failure": np.array([""] * count, dtype=object),
        "source_bytes": np.array([1000 if w == 0 else 0 for _, w, _ in rows], dtype=np.int64),
    }


def concat(*batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def take(batch: dict[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    return {name: values[rows] for name, values in batch.items()}


def shuffled_batches(batch: dict[str, np.ndarray], parts: int, seed: int = 1) -> list[dict]:
    order = np.random.default_rng(seed).permutation(len(batch["key"]))
    return [take(batch, rows) for rows in np.array_split(order, parts)]


def stage_and_commit(spec: OutputSpec, batches, sources: dict[str, list[str]]) -> dict[str, dict]:
    """What the lead's graph does: stage every batch, commit units as the ledger completes them."""
    ledger = StagingLedger()
    markers = {}
    for batch in batches:
        for done in ledger.add(write_staging_parts(batch, spec)):
            markers[done.unit_id] = commit_unit(spec, done, sources[done.unit_id])
    assert ledger.pending == {}
    return markers


def stored(uri: str) -> set[str]:
    """Every file under uri, relative, from a fresh filesystem instance (no listing cache)."""
    fs, root = fsspec.core.url_to_fs(uri, skip_instance_cache=True)
    if not fs.exists(root):
        return set()
    return {path[len(root.rstrip("/")) + 1 :] for path in fs.find(root)}


def read_final(uri: str, unit_id: str) -> pa.Table:
    fs, root = fsspec.core.url_to_fs(uri, skip_instance_cache=True)
    with fs.open(f"{root}/{unit_id}.parquet", "rb") as file:
        return pq.read_table(file)


@pytest.fixture(params=["local", "s3"])
def output_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_server").create_bucket(f"out-{uuid.uuid4().hex[:12]}")
    return f"{bucket}/labels"


# --- schema and rows --------------------------------------------------------------------------


def test_schema_has_exactly_the_agreed_columns_and_types():
    schema = output_schema(hidden_size=768, num_labels=527)
    assert [(f.name, f.type) for f in schema] == [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("window_index", pa.int32()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("embedding", pa.list_(pa.float32(), 768)),
        ("scores", pa.list_(pa.float32(), 527)),
        ("top_labels", pa.list_(pa.string())),
        ("top_scores", pa.list_(pa.float32())),
        ("metadata", pa.string()),
        ("error", pa.string()),
    ]


def test_rows_round_trip_with_null_vectors_on_error_rows(tmp_path):
    spec = make_spec(str(tmp_path / "out"))
    batch = unit_batch("shard-000000", {"a": 2, "b": 1}, error_keys=["bad"])
    stage_and_commit(spec, [batch], {"shard-000000": ["s3://in/shard-000000.tar"]})
    table = read_final(spec.location.uri, "shard-000000")
    assert table.schema.equals(output_schema(HIDDEN, len(LABELS)), check_metadata=False)
    rows = table.to_pylist()
    assert [(r["key"], r["window_index"], r["error"]) for r in rows] == [
        ("a", 0, None),
        ("a", 1, None),
        ("b", 0, None),
        ("bad", 0, "cannot decode bad"),
    ]
    bad = rows[3]
    assert bad["embedding"] is None and bad["scores"] is None
    assert bad["top_labels"] is None and bad["top_scores"] is None
    good = rows[0]
    np.testing.assert_array_equal(np.array(good["embedding"], np.float32), batch["embedding"][0])
    top = batch["top_index"][0]
    assert good["top_labels"] == [LABELS[i] for i in top]
    np.testing.assert_allclose(good["top_scores"], batch["scores"][0][top], rtol=0, atol=0)
    assert good["metadata"] == json.dumps({"k": "a"}) and good["sample_rate"] == 44100

    described = json.loads(table.schema.metadata[b"ast_label"])
    assert described["label_names"] == list(LABELS)
    assert described["weights_sha256"] == "ab" * 32
    assert described["model_fingerprint"] == spec.model_fingerprint


def test_top_lists_come_from_top_index_and_label_names_and_are_null_on_error_rows(tmp_path):
    spec = make_spec(str(tmp_path))
    batch = unit_batch("u", {"a": 3}, error_keys=["bad"])
    table = rows_to_table(batch, spec)
    for row, top in enumerate(batch["top_index"][:3]):
        assert table["top_labels"][row].as_py() == [LABELS[i] for i in top]
        assert table["top_scores"][row].as_py() == batch["scores"][row][top].tolist()
    assert table["top_labels"][3].as_py() is None and table["top_scores"][3].as_py() is None
    assert len(table["top_labels"].combine_chunks().values) == 3 * TOP_K  # nulls hold nothing


def test_row_with_wrong_embedding_size_is_rejected(tmp_path):
    batch = unit_batch("u", {"a": 1}, hidden=HIDDEN + 1)
    with pytest.raises(ValueError, match=r"embedding: expected shape \(1, 8\)"):
        rows_to_table(batch, make_spec(str(tmp_path)))


def test_fingerprint_ignores_model_path_and_package_version_but_not_weights(tmp_path):
    base = make_spec(str(tmp_path))
    assert (
        make_spec(
            str(tmp_path), model="s3://models/tiny", package_version="0.2.0"
        ).model_fingerprint
        == base.model_fingerprint
    )
    assert (
        make_spec(str(tmp_path), weights_sha256="cd" * 32).model_fingerprint
        != base.model_fingerprint
    )
    assert make_spec(str(tmp_path), hop_s=5.12).model_fingerprint != base.model_fingerprint


# --- ledger -----------------------------------------------------------------------------------


def records(*rows: tuple[str, str, int, int]) -> dict[str, np.ndarray]:
    unit_id, part_uri, count, total = zip(*rows, strict=True)
    return {
        "unit_id": np.array(unit_id, dtype=object),
        "part_uri": np.array(part_uri, dtype=object),
        "rows": np.array(count),
        "unit_rows": np.array(total),
        "unit_failure": np.array([""] * len(rows), dtype=object),
    }


def test_ledger_completes_a_unit_only_when_all_its_parts_are_in():
    ledger = StagingLedger()
    # Unit a: 10 rows in parts of 4 + 3 + 3, mixed into batches with unit b's parts.
    assert ledger.add(records(("a", "a/1", 4, 0), ("b", "b/1", 5, 0))) == []
    assert ledger.add(records(("a", "a/2", 3, 10))) == []  # total known, 7 of 10 rows in
    assert ledger.pending == {"a": (7, 10), "b": (5, 0)}
    done = ledger.add(records(("b", "b/2", 1, 6), ("a", "a/3", 3, 0)))
    assert [(d.unit_id, d.part_uris, d.rows) for d in done] == [
        ("b", ("b/1", "b/2"), 6),
        ("a", ("a/1", "a/2", "a/3"), 10),
    ]
    assert ledger.pending == {}


def test_ledger_completes_when_the_total_arrives_last_and_counts_a_repeated_record_once():
    ledger = StagingLedger()
    assert ledger.add(records(("u", "u/1", 2, 0))) == []
    assert ledger.add(records(("u", "u/1", 2, 0))) == []  # the same part reported again
    [done] = ledger.add(records(("u", "u/2", 1, 3)))
    assert done.part_uris == ("u/1", "u/2") and done.rows == 3


def test_ledger_never_commits_a_unit_with_more_rows_than_it_has():
    ledger = StagingLedger()
    ledger.add(records(("u", "u/1", 2, 3)))
    assert ledger.add(records(("u", "u/2", 3, 0))) == []
    assert ledger.failed == {"u": "5 rows staged but the unit has 3 (rows arrived twice)"}
    # Whatever arrives for it later is ignored: the unit stays failed, never committed.
    assert ledger.add(records(("u", "u/3", 1, 3))) == [] and ledger.pending == {}


def test_ledger_fails_a_unit_that_reports_a_storage_failure():
    ledger = StagingLedger()
    ledger.add(records(("u", "u/1", 2, 0), ("v", "v/1", 1, 1)))
    failure = {
        "unit_id": np.array(["u"], dtype=object),
        "part_uri": np.array([""], dtype=object),
        "rows": np.array([1]),
        "unit_rows": np.array([4]),
        "unit_failure": np.array(["cannot read s3://b/u.tar: OSError: boom"], dtype=object),
    }
    assert ledger.add(failure) == []
    assert ledger.failed == {"u": "cannot read s3://b/u.tar: OSError: boom"}
    assert ledger.new_failures() == [("u", "cannot read s3://b/u.tar: OSError: boom")]
    # Parts of the failed unit still on their way change nothing, and are reported once.
    assert ledger.add(records(("u", "u/2", 2, 0))) == [] and ledger.pending == {}
    assert ledger.new_failures() == [] and set(ledger.failed) == {"u"}


# --- commit -----------------------------------------------------------------------------------


def test_commit_writes_one_sorted_file_per_unit_and_a_marker(output_uri):
    spec = make_spec(output_uri)
    unit_a = unit_batch("shard-a", {"k3": 3, "k1": 2, "k2": 1}, error_keys=["k0"], seed=1)
    unit_b = unit_batch("shard-b", {"x": 2}, seed=2)
    sources = {"shard-a": ["s3://in/a.tar"], "shard-b": ["s3://in/b.tar"]}
    markers = stage_and_commit(spec, shuffled_batches(concat(unit_a, unit_b), 3), sources)

    assert stored(output_uri) == {
        "shard-a.parquet",
        "shard-b.parquet",
        ".ast-label/commits/shard-a.json",
        ".ast-label/commits/shard-b.json",
    }
    table = read_final(output_uri, "shard-a")
    assert list(zip(table["key"].to_pylist(), table["window_index"].to_pylist(), strict=True)) == [
        ("k0", 0),
        ("k1", 0),
        ("k1", 1),
        ("k2", 0),
        ("k3", 0),
        ("k3", 1),
        ("k3", 2),
    ]
    marker = markers["shard-a"]
    assert read_commit_markers(at(output_uri)) == {
        unit_id: CommittedUnit.from_marker(written) for unit_id, written in markers.items()
    }
    assert {k: marker[k] for k in ("unit_id", "sources", "rows", "files", "windows", "errors")} == {
        "unit_id": "shard-a",
        "sources": ["s3://in/a.tar"],
        "rows": 7,
        "files": 4,
        "windows": 6,
        "errors": 1,
    }
    # Each labeled file's duration once: k1 1.5 windows, k2 0.5, k3 2.5 (error rows not counted).
    assert marker["audio_seconds"] == pytest.approx(WINDOW_S * 4.5, abs=1e-6)
    assert marker["error_reasons"] == {"cannot decode k0": 1}
    assert marker["model_fingerprint"] == spec.model_fingerprint and marker["run_id"] == "run1"
    assert marker["file"] == "shard-a.parquet"


def test_rerun_commit_writes_identical_file(tmp_path):
    uri = str(tmp_path / "out")
    unit = unit_batch("u", {"a": 3, "b": 2}, error_keys=["c"])
    first = stage_and_commit(
        make_spec(uri, "run1"), shuffled_batches(unit, 2, seed=1), {"u": ["s"]}
    )
    first_bytes = (tmp_path / "out" / "u.parquet").read_bytes()
    second = stage_and_commit(
        make_spec(uri, "run2"), shuffled_batches(unit, 3, seed=2), {"u": ["s"]}
    )
    assert (tmp_path / "out" / "u.parquet").read_bytes() == first_bytes
    ignore = ("run_id", "committed_at")
    assert {k: v for k, v in first["u"].items() if k not in ignore} == {
        k: v for k, v in second["u"].items() if k not in ignore
    }
    marker = json.loads((tmp_path / "out" / ".ast-label" / "commits" / "u.json").read_text())
    assert marker["run_id"] == "run2"


def test_parts_of_a_killed_run_are_not_committed_and_are_deleted(output_uri):
    unit = unit_batch("u", {"a": 3, "b": 2})
    # A killed run staged some of the unit's rows and never committed.
    write_staging_parts(take(unit, slice(0, 3)), make_spec(output_uri, "killed"))
    assert len([p for p in stored(output_uri) if p.startswith(".ast-label/staging/u/killed-")]) == 1

    stage_and_commit(make_spec(output_uri, "run2"), shuffled_batches(unit, 2), {"u": ["s"]})
    assert read_final(output_uri, "u").num_rows == 5
    assert stored(output_uri) == {"u.parquet", ".ast-label/commits/u.json"}


def test_commit_refuses_a_row_count_that_does_not_match(tmp_path):
    spec = make_spec(str(tmp_path))
    [record] = [write_staging_parts(unit_batch("u", {"a": 2}), spec)]
    with pytest.raises(RuntimeError, match="hold 2 rows, expected 3"):
        commit(spec, "u", ["s"], list(record["part_uri"]), 3)
    assert not (tmp_path / "u.parquet").exists()


def test_output_path_with_glob_characters_is_taken_literally(tmp_path):
    uri = str(tmp_path / "out[1]")
    (tmp_path / "out1").mkdir()  # what "out[1]" would match as a glob pattern
    (tmp_path / "out1" / "u.parquet").write_bytes(b"not ours")
    commit_units(uri, {"u": ["s"]})
    assert stored(uri) == {"u.parquet", ".ast-label/commits/u.json"}
    spec = make_spec(uri)
    assert set(check_resume(at(uri), spec, False).units) == {"u"}
    assert check_resume(at(uri), spec, True).units == {}
    assert stored(uri) == set() and (tmp_path / "out1" / "u.parquet").exists()


@pytest.mark.parametrize("unit_id", ["_hidden", ".hidden", "a/b", "../up", ""])
def test_unsafe_unit_ids_are_rejected(tmp_path, unit_id):
    with pytest.raises(ValueError, match="not a safe file name"):
        commit(make_spec(str(tmp_path)), unit_id, [], [], 0)


def test_readers_see_only_committed_rows_while_staging_exists(tmp_path):
    uri = str(tmp_path / "out")
    spec = make_spec(uri)
    stage_and_commit(spec, [unit_batch("done", {"a": 2, "b": 1})], {"done": ["s1"]})
    write_staging_parts(take(unit_batch("busy", {"c": 4}), slice(0, 3)), spec)  # not complete
    write_summary(at(uri), {"files": 2})
    assert any(p.startswith(".ast-label/staging/busy/") for p in stored(uri))

    assert pads.dataset(uri, format="parquet").count_rows() == 3
    assert len(pd.read_parquet(uri)) == 3
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{uri}/*.parquet')").fetchall() == [(3,)]
    keys = duckdb.sql(
        f"SELECT DISTINCT key FROM read_parquet('{uri}/*.parquet') ORDER BY key"
    ).fetchall()
    assert keys == [("a",), ("b",)]


def test_readers_on_s3_see_only_committed_rows(s3_server):
    uri = s3_server.create_bucket(f"out-{uuid.uuid4().hex[:12]}") + "/labels"
    spec = make_spec(uri)
    stage_and_commit(spec, [unit_batch("done", {"a": 2, "b": 1})], {"done": ["s1"]})
    write_staging_parts(take(unit_batch("busy", {"c": 4}), slice(0, 3)), spec)
    fs = s3_server.filesystem()
    assert pads.dataset(uri[len("s3://") :], filesystem=fs, format="parquet").count_rows() == 3


def test_file_over_the_multipart_threshold_goes_up_in_parts_on_s3(s3_server):
    # Random float32 embeddings do not compress: 2200 rows x 2048 x 4 bytes is about 17 MiB, over
    # twice the part size, so s3fs uploads it as a multipart upload (ETag "<md5>-<parts>").
    hidden = 2048
    assert 2200 * hidden * 4 > 2 * storage.S3_PART_BYTES
    uri = s3_server.create_bucket(f"big-{uuid.uuid4().hex[:12]}") + "/labels"
    spec = make_spec(uri, hidden=hidden)
    unit = unit_batch("big", {f"k{i:02d}": 100 for i in range(22)}, hidden=hidden)
    [marker] = stage_and_commit(
        spec, [take(unit, slice(0, 1100)), take(unit, slice(1100, None))], {"big": ["s"]}
    ).values()

    fs = s3_server.filesystem()
    info = fs.info(f"{uri[len('s3://') :]}/big.parquet")
    assert info["size"] == marker["bytes"] > 2 * storage.S3_PART_BYTES
    assert "-" in info["ETag"].strip('"')  # multipart
    table = read_final(uri, "big")
    assert table.num_rows == 2200
    np.testing.assert_array_equal(
        table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, hidden),
        unit["embedding"],
    )


# --- resume -----------------------------------------------------------------------------------


def commit_units(
    uri: str, units: dict[str, list[str]], run_id: str = "run1", **metadata
) -> dict[str, dict]:
    spec = make_spec(uri, run_id, **metadata)
    batches = [unit_batch(unit_id, {"a": 1, "b": 2}, seed=i) for i, unit_id in enumerate(units)]
    return stage_and_commit(spec, batches, units)


def test_resume_keeps_committed_units_and_clears_what_a_killed_run_left(output_uri):
    commit_units(output_uri, {"u1": ["s1"], "u2": ["s2"], "u3": ["s3"]})
    fs, root = fsspec.core.url_to_fs(output_uri)
    fs.rm(f"{root}/u2.parquet")  # a marker without its unit file: u2 is not committed
    fs.rm(f"{root}/.ast-label/commits/u3.json")  # killed between the unit file and its marker
    write_staging_parts(unit_batch("u4", {"a": 1}), make_spec(output_uri, "killed"))
    write_staging_parts(unit_batch("u1", {"a": 1}), make_spec(output_uri, "late"))

    resume = check_resume(at(output_uri), make_spec(output_uri), False)

    assert set(resume.units) == {"u1"} and resume.sources == {"s1"}
    assert stored(output_uri) == {"u1.parquet", ".ast-label/commits/u1.json"}


def test_resume_on_an_empty_output_finds_nothing(output_uri):
    resume = check_resume(at(output_uri), make_spec(output_uri), False)
    assert resume.units == {} and resume.sources == frozenset()


def test_resume_refuses_other_settings_naming_each_with_both_values(tmp_path):
    uri = str(tmp_path / "out")
    commit_units(uri, {"u1": ["s1"]}, weights_sha256="cd" * 32, hop_s=5.12)
    with pytest.raises(OutputError) as caught:
        check_resume(at(uri), make_spec(uri), False)
    message = str(caught.value)
    assert "holds results made with other settings" in message and "--overwrite" in message
    assert f"hop_s: 5.12 there, {WINDOW_S} here" in message
    assert "weights_sha256: cdcdcdcdcdcd there, abababababab here" in message
    assert "\n" not in message and isinstance(caught.value, UserError)
    with pytest.raises(OutputError, match="head: none there, 0123456789ab here"):
        check_resume(
            at(uri),
            make_spec(
                uri,
                weights_sha256="cd" * 32,
                hop_s=5.12,
                head={"sha256": "0123456789ab" * 5 + "cdef"},
            ),
            False,
        )


def test_overwrite_deletes_every_ast_label_file_and_nothing_else(output_uri):
    commit_units(output_uri, {"u1": ["s1"]}, weights_sha256="cd" * 32)
    write_staging_parts(unit_batch("u2", {"a": 1}), make_spec(output_uri))
    write_summary(at(output_uri), {"files": 1})
    fs, root = fsspec.core.url_to_fs(output_uri)
    fs.makedirs(f"{root}/other", exist_ok=True)  # a no-op on S3
    fs.pipe_file(f"{root}/README.txt", b"mine")
    fs.pipe_file(f"{root}/other/data.csv", b"x,y")
    assert check_resume(at(output_uri), make_spec(output_uri), overwrite=True).units == {}
    assert stored(output_uri) == {"README.txt", "other/data.csv"}
    assert read_commit_markers(at(output_uri)) == {}


def test_rerun_takes_markers_from_the_index_and_reads_only_newer_ones(tmp_path, monkeypatch):
    uri = str(tmp_path / "out")
    markers = commit_units(uri, {"u1": ["s1"], "u2": ["s2"]})
    time.sleep(0.05)
    write_index(at(uri), [CommittedUnit.from_marker(m) for m in markers.values()])
    time.sleep(0.05)
    newer = commit_units(uri, {"u3": ["s3"]})  # committed after the index was written
    commits = tmp_path / "out" / ".ast-label" / "commits"
    read: list[str] = []
    real_read_files = output_index.read_files
    monkeypatch.setattr(
        output_index,
        "read_files",
        lambda fs, paths, what: read.extend(paths) or real_read_files(fs, paths, what),
    )

    units = read_commit_markers(at(uri))

    assert units == {
        unit_id: CommittedUnit.from_marker(m) for unit_id, m in {**markers, **newer}.items()
    }
    assert read == [str(commits / "u3.json")]  # one GET, not three
    (commits / "u1.json").unlink()  # a marker gone is a unit gone, whatever the index says
    assert set(read_commit_markers(at(uri))) == {"u2", "u3"}


def test_a_corrupt_index_is_ignored_and_every_marker_read(tmp_path):
    uri = str(tmp_path / "out")
    markers = commit_units(uri, {"u1": ["s1"]})
    (tmp_path / "out" / ".ast-label" / "index.jsonl.gz").write_bytes(b"not gzip")
    assert read_commit_markers(at(uri)) == {"u1": CommittedUnit.from_marker(markers["u1"])}


def test_summary_is_written_as_json(output_uri):
    write_summary(at(output_uri), {"files": 3, "errors": 1})
    fs, root = fsspec.core.url_to_fs(output_uri, skip_instance_cache=True)
    assert json.loads(fs.cat_file(f"{root}/.ast-label/summary.json")) == {"errors": 1, "files": 3}


def test_ledger_hands_out_each_failure_once_in_order_with_its_first_reason():
    ledger = StagingLedger()
    ledger.fail("u", "first reason")
    ledger.fail("v", "v's reason")
    ledger.fail("u", "a later reason")  # never overwrites the first
    assert ledger.new_failures() == [("u", "first reason"), ("v", "v's reason")]
    ledger.fail("w", "w's reason")
    ledger.fail("v", "again")
    assert ledger.new_failures() == [("w", "w's reason")]
    assert ledger.new_failures() == []
    assert ledger.failed == {"u": "first reason", "v": "v's reason", "w": "w's reason"}


def test_markers_are_read_even_when_the_index_cannot_be_written(tmp_path, monkeypatch):
    uri = str(tmp_path / "out")
    markers = commit_units(uri, {"u1": ["s1"], "u2": ["s2"]})
    monkeypatch.setattr(output_index, "INDEX_REFRESH_AFTER", 0)  # rewrite the index after any read

    def failing_write_index(*args) -> None:
        raise StorageError("cannot write index: boom")

    monkeypatch.setattr(output_index, "write_index", failing_write_index)
    expected = {unit_id: CommittedUnit.from_marker(m) for unit_id, m in markers.items()}
    assert read_commit_markers(at(uri)) == expected  # the index is a cache: a warning, no failure
    assert set(check_resume(at(uri), make_spec(uri), False).units) == {"u1", "u2"}


def test_resume_and_overwrite_retry_a_failed_delete(output_uri, monkeypatch):
    monkeypatch.setenv("AST_LABEL_IO_DELAY_S", "0.01")
    commit_units(output_uri, {"u1": ["s1"]})
    write_staging_parts(unit_batch("u1", {"a": 1}), make_spec(output_uri, "late"))
    real_remove, failed = storage.delete_path_once, []

    def flaky_remove(fs, path: str) -> None:
        if path not in failed:  # each path's first delete fails, as in a store outage
            failed.append(path)
            raise OSError("503 Slow Down")
        real_remove(fs, path)

    monkeypatch.setattr(storage, "delete_path_once", flaky_remove)
    spec = make_spec(output_uri)
    assert set(check_resume(at(output_uri), spec, False).units) == {"u1"}
    assert stored(output_uri) == {"u1.parquet", ".ast-label/commits/u1.json"}
    check_resume(at(output_uri), spec, True)
    assert stored(output_uri) == set()
