"""`ast-label demo`: the corpus it writes, its summary, and the whole run on local Ray."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from click.testing import CliRunner

from pipeline.commands.cli import main
from pipeline.commands.demo import (
    DemoCorpus,
    DemoReport,
    file_results,
    find_misses,
    format_report,
    run_demo,
    write_demo_corpus,
)
from pipeline.commands.synthetic import CLASS_NAMES
from pipeline.labeling.summary import RunSummary
from pipeline.output.schema import output_schema


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> DemoCorpus:
    return write_demo_corpus(tmp_path_factory.mktemp("corpus"), seed=0)


@pytest.fixture(scope="module")
def demo_run(ray_local, tmp_path_factory) -> tuple[DemoReport, str]:
    """One real demo run: synthetic shards -> local Ray pipeline, bundled model -> Parquet."""
    lines: list[str] = []
    report = run_demo(tmp_path_factory.mktemp("demo"), echo=lines.append)
    return report, "\n".join(lines)


def test_demo_corpus_has_long_stereo_mixed_and_broken_files(corpus):
    assert len(corpus.shards) >= 3 and 150 <= corpus.num_files <= 400
    assert set(corpus.truth.values()) == set(CLASS_NAMES)
    assert len(corpus.broken) == 2
    seen_formats, seen_rates, long_files, keys = set(), set(), 0, []
    for shard in corpus.shards:
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            names = [member.name for member in members]
            for member in members:
                key, extension = member.name.rsplit(".", 1)
                keys.append((shard.name, key))
                if extension == "json":
                    metadata = json.loads(tar.extractfile(member).read())
                    truth = corpus.truth.get((shard.name, key)) or corpus.novel.get(
                        (shard.name, key)
                    )
                    assert metadata["label"] == truth
                elif (shard.name, key) in corpus.truth:
                    info = sf.info(io.BytesIO(tar.extractfile(member).read()))
                    seen_formats.add(info.format)
                    seen_rates.add((info.samplerate, info.channels))
                    long_files += info.duration > 20.48  # three windows or more
        # WebDataset: a sample's members are adjacent (audio, then its .json).
        stems = [name.rsplit(".", 1)[0] for name in names]
        assert stems[::2] == stems[1::2]
    assert {"WAV", "FLAC"} <= seen_formats
    assert (44100, 2) in seen_rates and (16000, 1) in seen_rates
    assert long_files >= 5
    assert len(set(keys)) * 2 == len(keys)


@pytest.mark.slow  # compares against the demo run's own corpus
def test_demo_corpus_is_reproducible(corpus, demo_run):
    first = corpus
    again = demo_run[0].corpus  # the demo wrote its own, with the default seed (0)
    assert [_digest(shard) for shard in again.shards] == [_digest(shard) for shard in first.shards]
    assert again.truth == first.truth and again.broken == first.broken
    assert again.novel == first.novel and len(first.novel) == 18


@pytest.mark.slow
def test_the_printed_recipe_trains_a_head_on_new_sounds_and_relabels_the_output(demo_run):
    """The demo's second act, as its report prints it: a head trained on examples of sounds the
    bundled model never heard finds them in the relabeled output, and says honestly how well."""
    report, printed = demo_run
    commands = [line.split("ast-label ", 1)[1].split() for line in printed.splitlines()
                if line.startswith("  ast-label ") and "head" in line]  # fmt: skip
    assert [command[0] for command in commands] == ["head", "relabel", "inspect"]
    for command in commands[:2]:
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0, result.output
        if command[0] == "head":
            assert "cross-validation: 5 folds split by file" in result.output
            accuracy = float(
                re.search(r"accuracy \(top score's label\) ([\d.]+)", result.output)[1]
            )
            assert accuracy >= 0.7  # chance: 0.51 (the "Other" share)
    relabeled = Path(commands[1][commands[1].index("--output") + 1])
    rows = pads.dataset(str(relabeled), format="parquet").to_table().to_pylist()
    found = [
        label in (row["head_labels"] or ())
        for row in rows
        if (label := report.corpus.novel.get((Path(row["shard"]).name, row["key"])))
    ]
    assert len(found) >= 18 and sum(found) >= 0.6 * len(found)
    inspected = CliRunner().invoke(main, [*commands[2], "--json"])
    assert json.loads(inspected.output)["query"]["head"] is True


@pytest.mark.slow
def test_demo_labels_every_file_and_turns_broken_ones_into_error_rows(demo_run):
    report, printed = demo_run
    corpus = report.corpus
    assert report.summary.files == corpus.num_files
    labelled = {(result.shard, result.key) for result in report.files}
    # every clip has rows, none extra
    assert labelled == set(corpus.truth) | set(corpus.broken) | set(corpus.novel)
    errors = {(result.shard, result.key) for result in report.files if result.error is not None}
    assert errors == set(corpus.broken)
    assert report.summary.errors == 2
    # Long files are labelled over several windows and still get one file-level label.
    assert max(result.windows for result in report.files) >= 3
    assert report.accuracy >= 0.90, report.misses[:10]
    assert f"{report.accuracy:.1%}" in printed
    assert "broken-truncated" in printed and "broken-not-audio" in printed


@pytest.mark.slow
def test_printed_one_liners_read_the_output(demo_run):
    import duckdb
    import pandas as pd

    report, printed = demo_run
    rows = sum(result.windows for result in report.files)
    assert str(report.labels_dir) in printed
    query = f"SELECT count(*) FROM '{report.labels_dir}/*.parquet'"
    assert duckdb.sql(query).fetchall() == [(rows,)]
    assert len(pd.read_parquet(report.labels_dir)) == rows


def _rows(label_names: tuple[str, ...]) -> pa.Table:
    """Three files as the pipeline writes them: a two-window file whose windows disagree, a
    one-window file, and an error row."""

    def scores(*values: float) -> list[float]:
        return list(values) + [0.0] * (len(label_names) - len(values))

    def row(shard: str, key: str, window: int, scores: list[float] | None, error: str | None):
        return {
            "shard": f"/corpus/{shard}", "key": key, "window_index": window,
            "start_s": 10.24 * window,
            "end_s": 10.24 * (window + 1), "duration_s": 12.0, "sample_rate": 16000,
            "embedding": None if error else [0.0] * 4, "scores": scores, "top_labels": [],
            "top_scores": [], "metadata": None, "error": error,
        }  # fmt: skip

    records = [
        row("shard-000000.tar", "a", 0, scores(0.6, 0.4), None),
        row("shard-000000.tar", "a", 1, scores(0.0, 1.0), None),
        row("shard-000000.tar", "b", 0, scores(0.9, 0.1), None),
        row("shard-000001.tar", "c", 0, None, "not audio"),
    ]
    return pa.Table.from_pylist(records, schema=output_schema(4, len(label_names)))


def test_summary_counts_labels_accuracy_and_errors_without_ray(tmp_path):
    table = _rows(CLASS_NAMES)
    results = file_results(table, CLASS_NAMES)
    # "a": window means are (0.3, 0.7): the file label is the mean's argmax, not window 0's.
    assert [(r.key, r.predicted, r.windows, r.error) for r in results] == [
        ("a", CLASS_NAMES[1], 2, None),
        ("b", CLASS_NAMES[0], 1, None),
        ("c", None, 1, "not audio"),
    ]
    assert results[0].score == pytest.approx(0.7)
    corpus = DemoCorpus(
        directory=tmp_path,
        shards=(tmp_path / "shard-000000.tar", tmp_path / "shard-000001.tar"),
        truth={
            ("shard-000000.tar", "a"): CLASS_NAMES[1],
            ("shard-000000.tar", "b"): CLASS_NAMES[2],
            ("shard-000001.tar", "d"): CLASS_NAMES[3],  # lost: no rows at all
        },
        broken={("shard-000001.tar", "c"): "a text file named .wav"},
    )
    summary = RunSummary(
        output=str(tmp_path / "labels"), units=2, files=3, windows=4, errors=1, audio_hours=0.01,
        files_now=3, audio_hours_now=0.01, wall_s=2.0, files_per_s=1.5,
    )  # fmt: skip
    report = DemoReport(
        corpus, summary, tmp_path / "labels", tuple(results), find_misses(corpus, results)
    )
    assert report.correct == 1 and report.accuracy == pytest.approx(1 / 3)
    text = format_report(report)
    assert "1/3 = 33.3%" in text
    assert f"true {CLASS_NAMES[2]!r}, got {CLASS_NAMES[0]!r}" in text
    assert "no rows in the output" in text
    assert (
        "Error rows: 1" in text
        and "not audio" in text
        and "[planted: a text file named .wav]" in text
    )
    assert "1.5 files/s" in text
    assert f"{tmp_path / 'labels'}/*.parquet" in text and "pd.read_parquet" in text


def test_printed_duckdb_and_pandas_one_liners_run(tmp_path):
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    pq.write_table(_rows(CLASS_NAMES), labels_dir / "shard-000000-abc.parquet")
    corpus = DemoCorpus(tmp_path, (), {}, {})
    summary = RunSummary(output=str(labels_dir))
    text = format_report(DemoReport(corpus, summary, labels_dir, (), ()))
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("python -c")]
    assert len(commands) == 2
    for command in commands:
        run = subprocess.run(
            shlex.quote(sys.executable) + command.removeprefix("python"),
            shell=True, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "not audio" in run.stdout  # the error row's reason, read back
