"""`ast-label inspect` and its scan: counts, label queries with times, plots, s3:// outputs,
and a 100k-row output, on outputs written here in the pipeline's own schema (no Ray)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from labels_output import spec_for, synthetic_output, write_unit

from pipeline.commands.cli import main
from pipeline.commands.inspect_report import format_inspection, inspection_json
from pipeline.commands.inspection import (
    UnknownLabel,
    duckdb_label_query,
    files_with_label,
    inspect_output,
    resolve_label,
)
from pipeline.commands.unit_reduction import LabelQuery, LabelSpace, reduce_unit
from pipeline.errors import UserError
from pipeline.output.layout import OutputLocation, write_labels_table
from pipeline.output.reader import UnreadableOutput
from pipeline.storage import filesystem_for

LABELS = ("Speech", "Dog", "Bark", "Music", "Silence")


@dataclass
class Row:
    """One output row; `scores` by label name, the rest 0."""

    shard: str
    key: str
    window: int
    start_s: float
    end_s: float
    duration_s: float
    scores: dict[str, float] | None = None
    error: str | None = None


def rows_table(rows: list[Row], label_names=LABELS, hidden: int = 4) -> pa.Table:
    spec = spec_for(label_names, hidden)
    records = []
    for row in rows:
        scores = None
        if row.error is None:
            scores = [float((row.scores or {}).get(name, 0.0)) for name in label_names]
        records.append(
            {
                "shard": row.shard,
                "key": row.key,
                "window_index": row.window,
                "start_s": row.start_s,
                "end_s": row.end_s,
                "duration_s": row.duration_s,
                "sample_rate": 16000,
                "embedding": None if row.error else [0.0] * hidden,
                "scores": scores,
                "top_labels": None if row.error else [],
                "top_scores": None if row.error else [],
                "metadata": None,
                "error": row.error,
            }
        )
    return pa.Table.from_pylist(records, schema=spec.schema)


def long_file(shard: str, key: str, dog: list[float], hop: float = 10.0, window: float = 10.0):
    """A file of len(dog) windows with the given Dog scores (Speech gets the rest)."""
    duration = hop * (len(dog) - 1) + window
    return [
        Row(shard, key, i, i * hop, min(duration, i * hop + window), duration,
            {"Dog": score, "Speech": 1.0 - score})
        for i, score in enumerate(dog)
    ]  # fmt: skip


@pytest.fixture()
def small_output(tmp_path):
    """Two units: tar shard members, a long file where Dog comes and goes, a file with overlapping
    windows, error rows with two reasons, a key duplicated in another shard."""
    out = str(tmp_path / "out")
    tar_a, tar_b = "s3://corpus/shard-000000.tar", "s3://corpus/shard-000001.tar"
    unit_a = [
        *long_file(tar_a, "walk", [0.1, 0.9, 0.8, 0.2, 0.7, 0.1]),  # 60 s
        Row(tar_a, "quiet", 0, 0.0, 4.0, 4.0, {"Silence": 0.95}),
        Row(tar_a, "broken", 0, 0.0, 0.0, 0.0, error="cannot decode .wav: not audio"),
    ]
    unit_b = [
        Row(tar_b, "walk", 0, 0.0, 8.0, 8.0, {"Dog": 0.6, "Bark": 0.4}),  # same key, other tar
        # hop 5 s, window 10 s: windows 0-10, 5-15, 10-20, 15-25, 20-30 overlap
        *long_file(tar_b, "overlap", [0.9, 0.95, 0.3, 0.3, 0.9], hop=5.0),
        Row(tar_b, "empty", 0, 0.0, 0.0, 0.0, error="empty file"),
        Row(tar_b, "empty2", 0, 0.0, 0.0, 0.0, error="empty file"),
    ]
    write_unit(out, "shard-000000", rows_table(unit_a))
    write_unit(out, "shard-000001", rows_table(unit_b))
    return out


def test_counts_error_reasons_and_files_per_top_label(small_output):
    inspection = inspect_output(small_output)
    assert inspection.counts == {
        "unit_files": 2,
        "files": 7,  # "walk" in two shards counts twice
        "labeled_files": 4,
        "files_with_errors": 3,
        "windows": 6 + 1 + 1 + 5,
        "error_rows": 3,
        "audio_hours": pytest.approx((60 + 4 + 8 + 30) / 3600),
    }
    assert inspection.error_reasons == {"empty file": 2, "cannot decode .wav: not audio": 1}
    # A file's top label is the highest mean over its windows: "walk" in shard 0 has Dog 0.467 <
    # Speech 0.533; "overlap" has Dog 0.67.
    assert inspection.label_distribution() == [("Dog", 2), ("Speech", 1), ("Silence", 1)]
    text = format_inspection(inspection)
    assert "files 7 (4 labeled, 3 with errors), windows 13, error rows 3" in text
    assert "2  empty file" in text and "Dog" in text


def test_label_query_gives_each_files_max_and_the_times_where_it_scores(small_output):
    matches = files_with_label(small_output, "Dog", 0.6).to_pylist()
    assert [(m["shard"][-16:], m["key"]) for m in matches] == [
        ("shard-000001.tar", "overlap"),  # 0.95
        ("shard-000000.tar", "walk"),  # 0.9
        ("shard-000001.tar", "walk"),  # 0.6: at the threshold counts
    ]
    overlap, walk, short = matches
    assert overlap["label_max"] == pytest.approx(0.95)
    assert (overlap["windows"], overlap["label_windows"]) == (5, 3)
    # 0-10 and 5-15 overlap: one span; 20-30 does not touch it (10-20, 15-25 scored 0.3).
    assert overlap["spans"] == [{"start_s": 0.0, "end_s": 15.0}, {"start_s": 20.0, "end_s": 30.0}]
    assert walk["spans"] == [{"start_s": 10.0, "end_s": 30.0}, {"start_s": 40.0, "end_s": 50.0}]
    assert (walk["windows"], walk["label_windows"], walk["duration_s"]) == (6, 3, 60.0)
    assert short["spans"] == [{"start_s": 0.0, "end_s": 8.0}]

    text = format_inspection(inspect_output(small_output, "dog", 0.6))  # any case
    assert "Files where 'Dog' >= 0.6 in some window: 3 of 4 labeled files" in text
    assert "shard-000000.tar:walk" in text and "0:10.0-0:30.0, 0:40.0-0:50.0" in text
    assert "whole file" in text  # the one-window match
    assert inspect_output(small_output, "Dog", 0.99).matches().num_rows == 0


def test_spans_touching_windows_merge_and_the_json_report_lists_them(small_output):
    report = inspection_json(inspect_output(small_output, "Dog", 0.6), top=1)
    assert report["files"] == 7 and report["files_per_top_label"]["Dog"] == 2
    assert report["query"]["files"] == 3 and len(report["query"]["matches"]) == 1
    json.dumps(report)  # serialisable as it is


def _reference(rows: list[Row], label: str, min_score: float) -> dict:
    """Per (shard, key): (windows, error rows, top label by mean, label max, hit windows), in
    plain Python."""
    by_file: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        by_file.setdefault((row.shard, row.key), []).append(row)
    result = {}
    for file, file_rows in by_file.items():
        ok = [row for row in file_rows if row.error is None]
        top = label_max = None
        hits = 0
        if ok:
            means = {n: np.mean([r.scores.get(n, 0.0) for r in ok]) for n in LABELS}
            top = max(LABELS, key=lambda n: (means[n], -LABELS.index(n)))
            label_max = max(r.scores.get(label, 0.0) for r in ok)
            hits = sum(r.scores.get(label, 0.0) >= min_score for r in ok)
        result[file] = (len(ok), len(file_rows) - len(ok), top, label_max, hits)
    return result


def test_vectorised_reduction_equals_a_per_row_reference_on_shuffled_rows():
    rng = np.random.default_rng(0)
    rows = []
    for f in range(300):
        shard = f"shard-{f % 3}"
        if rng.random() < 0.1:
            rows.append(Row(shard, f"k{f}", 0, 0, 0, 0, error=f"reason {f % 2}"))
            continue
        windows = int(rng.integers(1, 8))
        for w in range(windows):
            scores = dict(zip(LABELS, rng.random(len(LABELS)).round(3), strict=True))
            rows.append(Row(shard, f"k{f}", w, w * 10.0, w * 10.0 + 10.0, windows * 10.0, scores))
    order = rng.permutation(len(rows))  # the reduction must not rely on the writer's sort order
    table = rows_table([rows[i] for i in order])
    scan = reduce_unit(table, LabelSpace(LABELS), LabelQuery("Dog", 1, 0.5))
    got = {
        (row["shard"], row["key"]): (
            row["windows"],
            row["error_rows"],
            LABELS[row["top_label"]] if row["top_label"] >= 0 else None,
            row["label_max"],
            row["label_windows"],
        )
        for row in scan.files.to_pylist()
    }
    expected = _reference(rows, "Dog", 0.5)
    assert got.keys() == expected.keys()
    for file, (windows, errors, top, label_max, hits) in expected.items():
        assert got[file][:3] == (windows, errors, top), file
        assert got[file][4] == hits, file
        if label_max is None:
            assert got[file][3] is None
        else:
            assert got[file][3] == pytest.approx(label_max, abs=1e-6), file


def test_unknown_label_fails_with_one_line_naming_close_matches():
    many = tuple(f"Label {i}" for i in range(20)) + ("Dog", "Dogs, many", "Hot dog", "Doorbell")
    with pytest.raises(UnknownLabel) as error:
        resolve_label("dgo", many)
    message = str(error.value)
    assert "\n" not in message and "'dgo'" in message and "'Dog'" in message
    with pytest.raises(UnknownLabel, match=r"close matches: 'Dog', 'Dogs, many', 'Hot dog'"):
        resolve_label("og", many)  # names that contain it first
    with pytest.raises(UnknownLabel, match="labels are 'Speech', 'Dog', 'Bark'"):
        resolve_label("Cat", LABELS)  # a short list is given whole
    assert resolve_label("bark", LABELS) == 2
    assert issubclass(UnknownLabel, UserError)


def test_only_committed_unit_files_are_read_and_a_copy_without_markers_is_read_whole(tmp_path):
    out = str(tmp_path / "out")
    rows = [Row("s", "a", 0, 0.0, 5.0, 5.0, {"Dog": 1.0})]
    write_unit(out, "unit-a", rows_table(rows))
    write_unit(out, "unit-b", rows_table([Row("s", "b", 0, 0.0, 5.0, 5.0)]), marker=False)
    inspection = inspect_output(out)
    assert inspection.counts["files"] == 1 and inspection.output.uncommitted == 1
    assert "1 unit file without a commit marker left out" in format_inspection(inspection)

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("unit-a.parquet", "unit-b.parquet"):
        (copy / name).write_bytes((tmp_path / "out" / name).read_bytes())
    assert inspect_output(str(copy)).counts["files"] == 2


def test_what_is_not_an_output_fails_with_one_line(tmp_path):
    with pytest.raises(UnreadableOutput, match="no output at .*: no such folder"):
        inspect_output(str(tmp_path / "missing"))
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "a.wav").write_bytes(b"RIFF")
    with pytest.raises(UnreadableOutput, match="not an ast-label output: no \\*.parquet"):
        inspect_output(str(tmp_path / "audio"))
    pq.write_table(pa.table({"x": [1]}), tmp_path / "audio" / "other.parquet")
    with pytest.raises(UnreadableOutput, match="other.parquet has no ast_label metadata"):
        inspect_output(str(tmp_path / "audio"))
    (tmp_path / "running" / ".ast-label" / "staging").mkdir(parents=True)
    with pytest.raises(UnreadableOutput, match="no committed results yet"):
        inspect_output(str(tmp_path / "running"))


def test_plots_png_svg_and_html_report_are_written(small_output, tmp_path):
    from pipeline.commands.plots import write_plot

    with_query = inspect_output(small_output, "Dog", 0.6, timelines=6)
    # Long files (more than one window) that match, best first.
    assert [t.key for t in with_query.timelines] == ["overlap", "walk"]
    walk = with_query.timelines[1]
    assert "Dog" in walk.labels
    assert walk.scores.shape == (6, len(walk.labels))
    without = inspect_output(small_output, timelines=1)
    assert [t.key for t in without.timelines] == ["walk"]  # the longest

    png = write_plot(with_query, tmp_path / "labels.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    svg = write_plot(without, tmp_path / "labels.svg")
    assert b"<svg" in svg.read_bytes()[:1000]
    page = write_plot(with_query, tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and "<table>" in page
    assert "shard-000000.tar:walk" in page and "0:10.0-0:30.0" in page


def test_plot_needs_the_extra_and_a_known_file_type(small_output, tmp_path, monkeypatch):
    from pipeline.commands.plots import PlotError, check_plot_path

    with pytest.raises(PlotError, match="give a file name ending in .png"):
        check_plot_path(tmp_path / "x.gif")
    with pytest.raises(PlotError, match="does not exist"):
        check_plot_path(tmp_path / "no" / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(PlotError, match=r"pip install 'ast-label\[plot\]'"):
        check_plot_path(tmp_path / "x.png")


def test_cli_inspect_prints_text_json_and_one_line_errors(small_output, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", small_output, "--label", "Dog", "--min-score", "0.6"])
    assert result.exit_code == 0, result.output
    assert "Files where 'Dog' >= 0.6" in result.output and "0:40.0-0:50.0" in result.output

    result = runner.invoke(main, ["inspect", small_output, "-l", "Dog", "--json", "--top", "0"])
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["windows"] == 13 and report["query"]["files"] == 3

    result = runner.invoke(main, ["inspect", small_output, "--label", "Cat"])
    assert result.exit_code == 2 and "Error: unknown label 'Cat'" in result.output
    result = runner.invoke(main, ["inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no output at" in result.output
    result = runner.invoke(main, ["inspect", small_output, "--min-score", "5"])
    assert result.exit_code == 2 and "not a score" in result.output

    plot = tmp_path / "inspect.png"
    result = runner.invoke(main, ["inspect", small_output, "-l", "Dog", "--plot", str(plot)])
    assert result.exit_code == 0 and plot.stat().st_size > 0


def test_duckdb_and_pandas_one_liners_find_the_same_files(small_output):
    import duckdb
    import pandas as pd

    write_labels_table(OutputLocation.of(small_output), LABELS)
    table = pd.read_csv(f"{small_output}/.ast-label/labels.csv")
    assert table.to_dict("list") == {"index": list(range(len(LABELS))), "name": list(LABELS)}
    expected = {
        (row["shard"], row["key"]): row["label_max"]
        for row in files_with_label(small_output, "Dog", 0.6).to_pylist()
    }

    rows = duckdb.sql(duckdb_label_query(small_output, "Dog", 0.6)).fetchall()
    assert {(shard, key): score for shard, key, score in rows} == pytest.approx(expected)

    # The README's pandas lines.
    names = pd.read_csv(f"{small_output}/.ast-label/labels.csv")["name"].tolist()
    df = pd.read_parquet(small_output, columns=["shard", "key", "scores"], dtype_backend="pyarrow")
    best = df.assign(score=df.scores.list[names.index("Dog")]).groupby(["shard", "key"]).score.max()
    found = best[best >= 0.6].to_dict()
    assert found == pytest.approx(expected)


def test_labels_table_quotes_names_with_commas(tmp_path):
    import duckdb

    names = ("Beep, bleep", 'Say "hi"', "Plain")
    uri = write_labels_table(OutputLocation.of(str(tmp_path)), names)
    assert uri == f"{tmp_path}/.ast-label/labels.csv"
    rows = duckdb.sql(f"select index, name from read_csv('{uri}') order by index").fetchall()
    assert rows == list(enumerate(names))


@pytest.mark.slow
def test_an_output_on_s3_is_inspected_like_a_local_one(s3_server, small_output):
    bucket = s3_server.create_bucket("inspect-out")
    fs = s3_server.filesystem()
    local = filesystem_for(small_output)[0]
    for path in local.find(small_output):
        fs.pipe_file(f"{bucket[5:]}/labels/{path[len(small_output) + 1 :]}", local.cat_file(path))

    remote = inspect_output(f"{bucket}/labels", "Dog", 0.6)
    here = inspect_output(small_output, "Dog", 0.6)
    assert remote.counts == here.counts
    assert remote.matches().equals(here.matches())
    with pytest.raises(UnreadableOutput, match="no output at"):
        inspect_output(f"{bucket}/elsewhere")


@pytest.mark.slow
def test_a_100k_row_output_is_inspected(tmp_path):
    import pyarrow.compute as pc

    label_names = tuple(f"label {i}" for i in range(100))
    out = str(tmp_path / "big")
    rows = synthetic_output(out, 100_000, label_names)
    inspection = inspect_output(out, "label 7", 0.9, timelines=6)
    # What inspect should find, worked out from the unit files with pyarrow alone
    table = pa.concat_tables(
        pq.read_table(path, columns=["shard", "key", "duration_s", "scores", "error"])
        for path in sorted((tmp_path / "big").glob("shard-*.parquet"))
    )
    table = table.append_column("ok", pc.is_null(table["error"]))
    table = table.append_column("label_7", pc.list_element(table["scores"], 7))  # null: error
    files = table.group_by(["shard", "key"]).aggregate(
        [("ok", "sum"), ("ok", "count"), ("duration_s", "max"), ("label_7", "max")]
    )
    ok_rows = np.asarray(files["ok_sum"])
    error_rows = np.asarray(files["ok_count"]) - ok_rows
    duration = np.asarray(files["duration_s_max"])
    assert rows == table.num_rows == 100_000
    assert inspection.counts == {
        "unit_files": 100,
        "files": files.num_rows,
        "labeled_files": int(np.count_nonzero(ok_rows)),
        "files_with_errors": int(np.count_nonzero(error_rows)),
        "windows": int(ok_rows.sum()),
        "error_rows": int(error_rows.sum()),
        "audio_hours": pytest.approx(duration[ok_rows > 0].sum() / 3600.0, rel=1e-6),
    }
    assert 0 < inspection.counts["error_rows"] < inspection.counts["windows"]
    assert len(inspection.timelines) == 6
    label_max = np.asarray(files["label_7_max"].to_numpy(zero_copy_only=False), np.float64)
    expected = np.sort(label_max[label_max >= 0.9])[::-1]
    matches = inspection.matches()
    assert matches.num_rows == len(expected) > 0
    np.testing.assert_allclose(matches["label_max"].to_pylist(), expected, rtol=1e-6)


def test_a_unit_file_without_its_marker_is_uncommitted_even_when_no_marker_exists(tmp_path):
    # commit_unit writes the unit file, then its marker: a run killed between the two leaves a
    # file and the .ast-label folder but no marker at all. That file is not a result yet.
    out = str(tmp_path / "out")
    write_unit(out, "unit-a", rows_table([Row("s", "a", 0, 0.0, 5.0, 5.0)]), marker=False)
    with pytest.raises(UnreadableOutput, match="no committed results yet"):
        inspect_output(out)
    write_unit(out, "unit-b", rows_table([Row("s", "b", 0, 0.0, 5.0, 5.0)]))
    inspection = inspect_output(out)
    assert inspection.counts["files"] == 1 and inspection.output.uncommitted == 1


def test_a_failing_store_exits_3_and_a_file_that_is_not_parquet_exits_2(
    small_output, tmp_path, monkeypatch
):
    from fsspec.implementations.local import LocalFileSystem

    class Failing(LocalFileSystem):
        """Lists as usual; every read of a file fails as a dropped connection does."""

        def _open(self, *args, **kwargs):
            raise ConnectionResetError("connection reset by peer")

    monkeypatch.setenv("AST_LABEL_IO_ATTEMPTS", "2")
    monkeypatch.setenv("AST_LABEL_IO_DELAY_S", "0")
    failing = Failing(skip_instance_cache=True)
    monkeypatch.setattr("pipeline.output.layout.filesystem_for", lambda uri: (failing, uri))
    result = CliRunner().invoke(main, ["inspect", small_output])
    assert result.exit_code == 3, result.output
    assert "connection reset by peer" in result.output and "Traceback" not in result.output
    monkeypatch.undo()

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "unit.parquet").write_bytes(b"not parquet at all")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "junk")])
    assert result.exit_code == 2 and "cannot read unit.parquet" in result.output
