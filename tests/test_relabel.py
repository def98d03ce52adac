"""A head's labels on a corpus: `run --head`, `predict --head`, and `relabel` of an existing output
from its stored embeddings, which equals `run --head` and resumes after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from audio_corpus import encode, sine, tar_bytes
from click.testing import CliRunner
from labels_output import synthetic_output
from processes import kill_session

from ast_model.checkpoint_files import read_checkpoint
from pipeline.commands.cli import main
from pipeline.heads.head import Head, load_head, save_head
from pipeline.heads.relabel import RelabelConfig, relabel
from pipeline.labeling.run import run_labeling
from pipeline.settings import LabelingOptions, RunConfig

HEAD_LABELS = ("alarm", "hum", "other")
AST_LABEL = Path(sys.executable).with_name("ast-label")


def random_head(folder: Path, hidden: int, weights_sha256: str, multi_label=False, seed=0) -> Head:
    """A head of random weights for a base model: what `head train` writes, without training."""
    rng = np.random.default_rng(seed)
    head = Head(
        HEAD_LABELS,
        np.array([0.2, 0.5, 0.45], np.float32),
        multi_label,
        rng.standard_normal((len(HEAD_LABELS), hidden)).astype(np.float32),
        rng.standard_normal(len(HEAD_LABELS)).astype(np.float32),
        {"name": "test", "weights_sha256": weights_sha256, "hidden_size": hidden},
    )
    return save_head(head, str(folder), "# a test head\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_hf_checkpoint):
    folder = tmp_path_factory.mktemp("relabel")
    (folder / "in").mkdir()
    for shard in range(3):
        entries = [
            (f"c{i}.flac", encode(sine(1.0 + 6.0 * i, freq=300.0 + 90 * i + shard), 16_000, "flac"))
            for i in range(3)
        ]
        entries.append(("broken.wav", b"RIFF but not really audio" * 4))
        (folder / "in" / f"shard-{shard:06d}.tar").write_bytes(tar_bytes(entries))
    files = read_checkpoint(str(tiny_hf_checkpoint))
    head = random_head(folder / "head", files.config.hidden_size, files.weights_sha256)
    return folder, head


def run(corpus_folder: Path, output: Path, checkpoint: Path, head: str | None = None) -> None:
    options = LabelingOptions(model=str(checkpoint), batch_size=4, head=head)
    config = RunConfig((str(corpus_folder / "in"),), str(output), options=options)
    summary = run_labeling(config, echo=lambda line: None)
    assert summary.complete and summary.files == 12


def rows(output: Path):
    table = pads.dataset(str(output), format="parquet").to_table()
    return sorted(
        table.to_pylist(), key=lambda row: (row["shard"], row["key"], row["window_index"])
    )


@pytest.mark.slow
def test_run_with_a_head_equals_relabel_of_a_run_without_one(
    ray_local, corpus, tiny_hf_checkpoint, tmp_path
):
    folder, head = corpus
    run(folder, tmp_path / "with-head", tiny_hf_checkpoint, head=head.name)
    run(folder, tmp_path / "plain", tiny_hf_checkpoint)
    summary = relabel(
        RelabelConfig(str(tmp_path / "plain"), str(tmp_path / "relabeled"), head.name),
        echo=lambda line: None,
    )
    assert summary.complete and summary.files == 12 and summary.units_labeled == 3

    ran, relabeled = rows(tmp_path / "with-head"), rows(tmp_path / "relabeled")
    assert len(ran) == len(relabeled) == 3 * 5  # per shard: 1 + 1 + 2 windows and an error row
    for a, b in zip(ran, relabeled, strict=True):
        assert a.keys() == b.keys() and list(a)[-4:] == [
            "head_scores",
            "head_labels",
            "metadata",
            "error",
        ]
        for column in ("shard", "key", "window_index", "start_s", "end_s", "error", "top_labels"):
            assert a[column] == b[column], column
        if a["error"] is not None:
            assert a["head_scores"] is None and a["head_labels"] is None
            continue
        np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-6)
        np.testing.assert_allclose(a["head_scores"], b["head_scores"], atol=1e-5)
        # The head's numbers are numpy's on the stored embedding, from the saved files alone.
        expected = head.scores(np.asarray([b["embedding"]], np.float32))[0]
        np.testing.assert_allclose(b["head_scores"], expected, atol=1e-6)
        passed = [
            n for n, s, t in zip(HEAD_LABELS, expected, head.thresholds, strict=True) if s >= t
        ]
        assert sorted(b["head_labels"]) == sorted(passed)
        assert b["head_labels"] == sorted(passed, key=lambda n: -expected[HEAD_LABELS.index(n)])

    unit_file = next((tmp_path / "relabeled").glob("*.parquet"))
    described = json.loads(pq.read_schema(unit_file).metadata[b"ast_label"])
    assert described["head"]["sha256"] == head.sha256 and described["head_name"] == head.name
    table = (tmp_path / "relabeled" / ".ast-label" / "head-labels.csv").read_text().splitlines()
    assert table[0] == "index,name,threshold" and table[1] == "0,alarm,0.2"
    inspect_knows_the_head(tmp_path / "relabeled", head, relabeled)


def inspect_knows_the_head(output: Path, head: Head, rows: list[dict]) -> None:
    """`inspect` finds a head's label as it finds the model's, shows the files per head label,
    and names the files that failed."""
    with_label = {}
    for row in rows:
        for name in row["head_labels"] or ():
            with_label.setdefault(name, set()).add((row["shard"], row["key"]))
    label = max(with_label, key=lambda name: len(with_label[name]))
    result = CliRunner().invoke(main, ["inspect", str(output), "--json", "--label", label.upper()])
    report = json.loads(result.stdout)
    assert report["head"]["files_per_label"][label] == len(with_label[label])
    assert report["head"]["sha256"] == head.sha256
    assert report["query"]["head"] and report["query"]["label"] == label
    threshold = float(head.thresholds[HEAD_LABELS.index(label)])
    result = CliRunner().invoke(
        main, ["inspect", str(output), "--json", "-l", label, "--min-score", str(threshold)]
    )
    found = {(m["shard"], m["key"]) for m in json.loads(result.stdout)["query"]["matches"]}
    assert found == with_label[label]  # at its threshold: the files whose rows have the label
    failed = json.loads(result.stdout)["failed_files"]
    assert [f["key"] for f in failed] == ["broken"] * 3
    assert all(f["error"].startswith("cannot decode .wav") for f in failed)
    text = CliRunner().invoke(main, ["inspect", str(output), "--top", "2"]).stdout
    assert "Files per head label" in text and "Files that could not be labeled (3):" in text
    assert "... and 1 more" in text


@pytest.mark.slow
def test_predict_with_a_head_shows_its_labels_and_scores(corpus, tiny_hf_checkpoint):
    folder, head = corpus
    shard = str(folder / "in" / "shard-000000.tar")
    arguments = ["predict", shard, "--model", str(tiny_hf_checkpoint), "--head", head.name]
    windows = ["--windows", "--json", "--scores", "--embedding"]
    result = CliRunner().invoke(main, [*arguments, *windows])
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    labeled = [record for record in records if "error" not in record]
    assert len(labeled) == 4  # windows of three files
    for record in labeled:
        scores = head.scores(np.asarray([record["embedding"]], np.float32))[0]
        expected = dict(zip(HEAD_LABELS, scores, strict=True))
        assert record["head_scores"] == pytest.approx(expected, abs=1e-5)
        assert list(record["head_labels"]) == [
            n
            for n, _ in sorted(record["head_scores"].items(), key=lambda kv: -kv[1])
            if record["head_scores"][n] >= head.thresholds[HEAD_LABELS.index(n)]
        ]
    text = CliRunner().invoke(main, arguments)
    assert "| head: " in text.stdout


def test_a_head_of_another_model_or_size_is_refused_in_one_line(tmp_path):
    synthetic_output(str(tmp_path / "source"), 200, ("a", "b"), hidden=8, units=2)
    other = random_head(tmp_path / "other", 8, "f" * 64)
    narrow = random_head(tmp_path / "narrow", 4, "0" * 64)
    for head, expected in ((other, "trained on the embeddings of another model"), (narrow, "4-d")):
        arguments = ["relabel", str(tmp_path / "source"), "--head", head.name]
        result = CliRunner().invoke(main, [*arguments, "--output", str(tmp_path / "new")])
        assert result.exit_code == 2, result.output
        assert expected in result.output and len(result.output.strip().splitlines()) == 1
    # A head that fits the source, so that only the output being the source is wrong.
    fits = random_head(tmp_path / "fits", 8, "0" * 64)
    source = str(tmp_path / "source")
    same = CliRunner().invoke(main, ["relabel", source, "--head", fits.name, "--output", source])
    assert same.exit_code == 2, same.output
    assert "is the output being relabeled" in same.output


@pytest.mark.slow
def test_relabel_killed_part_way_and_run_again_commits_every_unit_once(ray_local, tmp_path):
    source = tmp_path / "source"
    synthetic_output(str(source), 60_000, ("a", "b", "c"), hidden=64, units=120)
    head = random_head(tmp_path / "head", 64, "0" * 64, multi_label=True)
    output = tmp_path / "relabeled"
    command = [str(AST_LABEL), "relabel", str(source), "--head", head.name, "--output", str(output)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    first = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    markers = output / ".ast-label" / "commits"
    deadline = time.monotonic() + 240
    while not list(markers.glob("*.json")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    kill_session(first.pid)
    first.wait()
    done_at_kill = len(list(markers.glob("*.json")))
    assert 1 <= done_at_kill < 120, "the kill should land part way through"

    # The same command again, here on the session's Ray (a fresh Ray's start is not the point).
    said: list[str] = []
    second = relabel(RelabelConfig(str(source), str(output), head.name), echo=said.append)
    assert second.complete and f"{done_at_kill} already relabeled" in said[0], said
    table = pads.dataset(str(output), format="parquet").to_table()
    assert table.num_rows == 60_000  # every row once, no unit twice
    keys = table.select(["shard", "key", "window_index"]).to_pylist()
    assert len({tuple(row.values()) for row in keys}) == table.num_rows
    assert not list(output.glob(".ast-label/staging/*"))
    source_rows = pads.dataset(str(source), format="parquet").to_table()
    assert sorted(source_rows["key"].to_pylist()) == sorted(table["key"].to_pylist())


def test_a_saved_head_loads_as_it_was_written(tmp_path):
    head = random_head(tmp_path / "head", 16, "a" * 64, multi_label=True)
    loaded = load_head(str(tmp_path / "head"))
    assert loaded.sha256 == head.sha256 and loaded.label_names == HEAD_LABELS
    embedding = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    np.testing.assert_array_equal(loaded.scores(embedding), head.scores(embedding))
    (tmp_path / "head" / "config.json").write_text("{}")
    result = CliRunner().invoke(main, ["predict", "x.wav", "--head", str(tmp_path / "head")])
    assert result.exit_code == 2 and "not an ast-label head" in result.output
