"""A real output, as `ast-label run` leaves it, loads as it is in every reader the README names:
pyarrow.dataset, pandas, DuckDB, Ray Data and Hugging Face `datasets`; the label query one-liners
work on it; and the bundled model folder loads in transformers' own audio-classification pipeline.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from audio_corpus import encode, sine, tar_bytes
from conftest import TINY_LABELS

from pipeline.commands.inspection import (
    duckdb_label_query,
    files_with_label,
    inspect_output,
)
from pipeline.labeling.run import run_labeling
from pipeline.labeling.summary import RunSummary
from pipeline.output.schema import output_schema
from pipeline.settings import LabelingOptions, RunConfig

COLUMNS = output_schema(1, 1).names  # pinned in test_output.py
SCORE_TOLERANCE = 1e-5  # as test_predict.py: JSON keeps 6 decimals; fp32 differs by ~1e-7


@pytest.fixture(scope="module")
def labeled(ray_local, tiny_hf_checkpoint, tmp_path_factory) -> tuple[str, RunSummary]:
    """One real run, shared by every reader: two tar shards, a 25 s clip (three windows), a
    member that is not audio (an error row), metadata members."""
    root = tmp_path_factory.mktemp("readers")
    (root / "in").mkdir()
    shards = {
        "shard-000000.tar": [
            ("tone.wav", encode(sine(2.0, freq=440.0), 16_000, "wav")),
            ("tone.json", json.dumps({"source": "test"}).encode()),
            ("long.flac", encode(sine(25.0, freq=1_000.0), 16_000, "flac")),
            ("notes.wav", b"meeting notes, not audio\n" * 20),
        ],
        "shard-000001.tar": [
            ("stereo.wav", encode(sine(3.0, sr=44_100, channels=2, freq=330.0), 44_100, "wav")),
            ("low.wav", encode(sine(1.5, sr=8_000, freq=200.0), 8_000, "wav")),
        ],
    }
    for name, members in shards.items():
        (root / "in" / name).write_bytes(tar_bytes(members))
    output = str(root / "out")
    summary = run_labeling(
        RunConfig(
            inputs=(str(root / "in"),),
            output=output,
            options=LabelingOptions(model=str(tiny_hf_checkpoint)),
        ),
        echo=lambda line: None,
    )
    assert (summary.files, summary.windows, summary.errors) == (5, 1 + 3 + 1 + 1, 1)
    return output, summary


def rows_of(summary: RunSummary) -> int:
    return summary.windows + summary.errors


def test_the_top_of_the_output_holds_only_data_and_sql_needs_no_quoting(labeled):
    import duckdb

    output, _ = labeled
    top = sorted(os.listdir(output))
    assert top[0] == ".ast-label" and len(top) == 3
    assert all(re.fullmatch(r"shard-00000[01]-\w+\.parquet", name) for name in top[1:]), top
    hidden = sorted(path.name for path in Path(output, ".ast-label").iterdir())
    assert {"commits", "summary.json", "labels.csv"} <= set(hidden)
    reserved = {
        word
        for (word,) in duckdb.sql(
            "select keyword_name from duckdb_keywords() where keyword_category = 'reserved'"
        ).fetchall()
    }
    for column in COLUMNS:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", column) and column not in reserved, column


def test_pyarrow_dataset_and_pandas_read_the_folder_as_it_is(labeled):
    import pandas as pd
    import pyarrow.dataset as pads

    output, summary = labeled
    table = pads.dataset(output, format="parquet").to_table()
    assert table.column_names == COLUMNS and table.num_rows == rows_of(summary)
    frame = pd.read_parquet(output)
    assert len(frame) == rows_of(summary)
    assert frame["error"].notna().sum() == summary.errors


def test_duckdb_reads_every_unit_file_with_plain_column_names(labeled):
    import duckdb

    output, summary = labeled
    rows = duckdb.sql(
        "select key, window_index, start_s, end_s, top_labels[1] as label, error "
        f"from read_parquet('{output}/*.parquet') order by key, window_index"
    ).fetchall()
    assert len(rows) == rows_of(summary)
    long_rows = [row for row in rows if row[0] == "long"]
    assert [(row[1], row[2], row[3]) for row in long_rows] == [
        (0, 0.0, 10.24),
        (1, 10.24, 20.48),
        (2, 20.48, 25.0),
    ]
    assert all(row[4] in TINY_LABELS for row in rows if row[5] is None)
    assert [row[0] for row in rows if row[5] is not None] == ["notes"]


def test_label_query_one_liners_agree_with_inspect(labeled):
    import duckdb
    import pandas as pd

    output, _ = labeled
    label = TINY_LABELS[1]
    # A threshold that some files pass: the tiny model's scores are arbitrary.
    threshold = float(np.median(files_with_label(output, label, 0.0)["label_max"]))
    expected = {
        (row["shard"], row["key"]): row["label_max"]
        for row in files_with_label(output, label, threshold).to_pylist()
    }
    assert expected
    rows = duckdb.sql(duckdb_label_query(output, label, threshold)).fetchall()
    assert {(shard, key): score for shard, key, score in rows} == pytest.approx(expected)

    names = pd.read_csv(f"{output}/.ast-label/labels.csv")["name"].tolist()
    assert names == list(TINY_LABELS)
    df = pd.read_parquet(output, columns=["shard", "key", "scores"], dtype_backend="pyarrow")
    best = df.assign(score=df.scores.list[names.index(label)]).groupby(["shard", "key"]).score.max()
    assert best[best >= threshold].to_dict() == pytest.approx(expected)


def test_inspect_counts_equal_the_run_summary(labeled):
    output, summary = labeled
    counts = inspect_output(output).counts
    assert counts["unit_files"] == summary.units == 2
    assert (counts["files"], counts["windows"], counts["error_rows"]) == (
        summary.files,
        summary.windows,
        summary.errors,
    )
    assert counts["audio_hours"] == pytest.approx(summary.audio_hours, abs=1e-6)


def test_ray_data_reads_the_folder_as_it_is(labeled):
    import ray

    output, summary = labeled
    dataset = ray.data.read_parquet(output)
    assert dataset.schema().names == COLUMNS
    rows = dataset.select_columns(["key", "window_index", "error"]).take_all()
    assert len(rows) == rows_of(summary)
    assert sum(row["error"] is not None for row in rows) == summary.errors


def test_hugging_face_datasets_loads_the_folder_both_ways(labeled, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    from datasets import load_dataset

    output, summary = labeled
    for args, kwargs in (
        (("parquet",), {"data_dir": output}),
        ((output,), {}),
    ):
        loaded = load_dataset(*args, **kwargs, cache_dir=str(tmp_path / "cache"))
        assert list(loaded) == ["train"], args
        train = loaded["train"]
        assert train.num_rows == rows_of(summary), args
        assert train.column_names == COLUMNS
        assert len(train[0]["scores"]) == len(TINY_LABELS)


@pytest.fixture()
def chirp_clip(tmp_path) -> tuple[Path, np.ndarray]:
    """A 6 s "Chirp tone" as the default model was trained on, written as 16-bit WAV; returns
    the file and the samples as the decoder reads them back."""
    import soundfile as sf

    from pipeline.commands.synthetic import generate_clip

    clip = generate_clip("Chirp tone", np.random.default_rng(7), 16_000, 6.0)
    path = tmp_path / "chirp.wav"
    sf.write(path, clip, 16_000, subtype="PCM_16")
    samples, _ = sf.read(path, dtype="float32")
    return path, samples


def test_bundled_model_labels_a_clip_in_transformers_pipeline_as_predict_does(chirp_clip):
    from click.testing import CliRunner
    from transformers import pipeline

    from ast_model.checkpoint_files import BUNDLED_MODEL_DIR
    from pipeline.commands.cli import main

    path, samples = chirp_clip
    classify = pipeline("audio-classification", model=str(BUNDLED_MODEL_DIR), device="cpu")
    theirs = classify({"raw": samples, "sampling_rate": 16_000}, top_k=3)

    result = CliRunner().invoke(main, ["predict", str(path), "--json", "--scores"])
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout.splitlines()[0])
    assert theirs[0]["label"] == next(iter(ours["labels"])) == "Chirp tone"
    for item in theirs:  # the same numbers, well inside the 1e-4 of README (measured: 4e-7)
        assert ours["scores"][item["label"]] == pytest.approx(item["score"], abs=SCORE_TOLERANCE)
