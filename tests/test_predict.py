"""`ast-label predict`: run's inputs, windows and numbers, in this process, on real files."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from audio_corpus import encode, sine, write_tar_shard
from click.testing import CliRunner
from conftest import TINY_LABELS

from ast_model.checkpoint import load_checkpoint
from ast_model.features import FbankConfig, compute_fbank
from ast_model.labels import scores_from_logits
from pipeline.commands.cli import main
from pipeline.commands.predict import PredictConfig, Predictor
from pipeline.settings import LabelingOptions

SCORE_TOLERANCE = 1e-5  # JSON keeps 6 decimals; fp32 batches of other sizes differ by ~1e-7


@pytest.fixture()
def clips(tmp_path):
    """Four real files in a folder: stereo 44.1 kHz WAV, FLAC, a 12 s Ogg (two windows), and a
    text file named .wav."""
    folder = tmp_path / "clips"
    folder.mkdir()
    files = {
        "stereo-44k.wav": encode(sine(2.0, sr=44_100, channels=2, freq=300.0), 44_100, "wav"),
        "tone.flac": encode(sine(1.0, sr=16_000, freq=1_000.0), 16_000, "flac"),
        "long.ogg": encode(sine(12.0, sr=22_050, freq=700.0), 22_050, "ogg"),
        "broken.wav": b"this is not audio" * 50,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def predict(*arguments: str, model) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["predict", *arguments, "--model", str(model)])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stdout, result.stderr


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_predict_prints_top_labels_per_file_and_reports_unreadable_ones(clips, tiny_hf_checkpoint):
    code, stdout, stderr = predict(str(clips), "-k", "3", model=tiny_hf_checkpoint)
    assert code == 1  # a file could not be labeled
    lines = stdout.strip().splitlines()
    # The folder's files in URI order, as run plans them; the broken one only on stderr.
    assert [line.split(": ")[0] for line in lines] == [
        str(clips / name) for name in ("long.ogg", "stereo-44k.wav", "tone.flac")
    ]
    for line in lines:
        labels = line.split(": ", 1)[1].split(", ")
        assert len(labels) == 3 and all(label.rsplit(" ", 1)[0] in TINY_LABELS for label in labels)
    assert f"{clips / 'broken.wav'}: cannot label: cannot decode" in stderr
    assert "Error: 1 of 4 files could not be labeled" in stderr


def test_predict_json_scores_equal_the_model_on_the_same_audio(clips, tiny_hf_checkpoint):
    path = clips / "tone.flac"
    code, stdout, _ = predict(
        str(path), "--json", "--scores", "--embedding", model=tiny_hf_checkpoint
    )
    assert code == 0
    [record] = json_lines(stdout)
    assert set(record) == {"key", "duration_s", "windows", "labels", "scores", "embedding"}
    assert record["key"] == str(path) and record["windows"] == 1
    loaded = load_checkpoint(str(tiny_hf_checkpoint))
    # FLAC stores 16-bit samples: compare with the decoded file, not the float sine.
    decoded, _ = sf.read(path, dtype="float32")
    wave = torch.from_numpy(decoded)[None, :]
    with torch.inference_mode():
        output = loaded.model(
            compute_fbank(wave, torch.tensor([wave.shape[1]]), FbankConfig.for_model(loaded.config))
        )
    expected = scores_from_logits(output.logits, loaded.config.multi_label)[0].numpy()
    assert list(record["scores"]) == list(TINY_LABELS)  # every label, in the model's order
    np.testing.assert_allclose(list(record["scores"].values()), expected, atol=SCORE_TOLERANCE)
    np.testing.assert_allclose(record["embedding"], output.embedding[0].numpy(), atol=1e-5)
    # labels: the top 5 (the default), best first.
    best = np.argsort(-expected, kind="stable")[:5]
    assert list(record["labels"]) == [TINY_LABELS[i] for i in best]


def test_predict_windows_rows_and_their_mean(clips, tiny_hf_checkpoint):
    path = str(clips / "long.ogg")
    _, per_file, _ = predict(path, "--json", "--scores", model=tiny_hf_checkpoint)
    code, per_window, _ = predict(path, "--json", "--scores", "--windows", model=tiny_hf_checkpoint)
    assert code == 0
    windows = json_lines(per_window)
    # 12 s -> 10.24 s + 1.76 s, as run cuts them.
    assert [(w["window_index"], w["start_s"], w["end_s"]) for w in windows] == [
        (0, 0.0, 10.24),
        (1, 10.24, 12.0),
    ]
    [file_record] = json_lines(per_file)
    assert file_record["windows"] == 2
    mean = np.mean([list(w["scores"].values()) for w in windows], axis=0)
    np.testing.assert_allclose(list(file_record["scores"].values()), mean, atol=SCORE_TOLERANCE)

    code, text, _ = predict(path, "--windows", "-k", "1", model=tiny_hf_checkpoint)
    assert code == 0
    assert [line.split(": ")[0] for line in text.splitlines()] == [
        f"{path} [0] 0.00-10.24 s",
        f"{path} [1] 10.24-12.00 s",
    ]


def test_predict_takes_folders_globs_brace_ranges_and_manifests(tmp_path, tiny_hf_checkpoint):
    folder = tmp_path / "audio"
    nested = folder / "deeper"
    nested.mkdir(parents=True)
    for index, where in enumerate((folder, folder, nested)):
        (where / f"clip-{index}.wav").write_bytes(
            encode(sine(0.5, freq=200.0 * (index + 1)), 16_000, "wav")
        )
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("audio/clip-0.wav\naudio/clip-1.wav\naudio/deeper/clip-2.wav\n")
    expected = [str(folder / "clip-0.wav"), str(folder / "clip-1.wav"), str(nested / "clip-2.wav")]
    for arguments in (
        [str(folder)],
        [str(folder / "**" / "*.wav")],
        [f"{folder}/clip-{{0..1}}.wav", str(nested / "clip-2.wav")],
        ["--manifest", str(manifest)],
    ):
        code, stdout, _ = predict(*arguments, "--json", model=tiny_hf_checkpoint)
        assert code == 0, arguments
        assert [record["key"] for record in json_lines(stdout)] == expected, arguments


def test_predict_labels_tar_members_under_their_shard(tmp_path, tiny_hf_checkpoint):
    shard = tmp_path / "shard-000000.tar"
    write_tar_shard(
        shard,
        [
            ("a.wav", encode(sine(1.0), 16_000, "wav")),
            ("a.json", b'{"label": "tone"}'),
            ("b.flac", encode(sine(0.5, freq=900.0), 16_000, "flac")),
            ("c.wav", b"not audio at all" * 10),
        ],
    )
    code, stdout, _ = predict(str(shard), "--json", model=tiny_hf_checkpoint)
    assert code == 1
    records = json_lines(stdout)
    assert [(r["shard"], r["key"]) for r in records] == [(str(shard), k) for k in "abc"]
    assert "labels" in records[0] and "labels" in records[1]
    assert records[2]["error"].startswith("cannot decode")


def test_predict_json_reports_failed_files_as_objects_on_stdout(clips, tiny_hf_checkpoint):
    (clips / "notes.txt").write_text("meeting notes")
    code, stdout, stderr = predict(str(clips), "--json", "--windows", model=tiny_hf_checkpoint)
    assert code == 1
    records = json_lines(stdout)  # every line is JSON, failures included
    errors = {r["key"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {str(clips / "broken.wav"), str(clips / "notes.txt")}
    assert "cannot decode" in errors[str(clips / "broken.wav")]
    assert all(set(r) == {"key", "error"} for r in records if "error" in r)
    assert len([r for r in records if "error" not in r]) == 4  # long.ogg has two windows
    assert stderr.strip() == "Error: 2 of 5 files could not be labeled"


def test_predict_checks_windows_like_run(clips, tiny_hf_checkpoint):
    path = str(clips / "long.ogg")
    for command in ("predict", "run"):
        extra = ["--model", str(tiny_hf_checkpoint)]
        extra += ["--output", str(clips / "out")] if command == "run" else []
        result = CliRunner().invoke(
            main,
            [command, path, "--window-s", "2", "--hop-s", "5", *extra],
            catch_exceptions=False,
        )
        assert result.exit_code == 2
        assert "Error: --hop-s 5 is longer than --window-s 2" in result.stderr
    code, stdout, _ = predict(
        path, "--window-s", "2", "--hop-s", "5", "--allow-gaps", "--json", "--windows",
        model=tiny_hf_checkpoint,
    )  # fmt: skip
    assert code == 0
    assert [r["start_s"] for r in json_lines(stdout)] == [0.0, 5.0, 10.0]


def test_files_that_vanish_after_planning_end_as_errors(tmp_path, tiny_hf_checkpoint):
    """A storage fault part-way through a unit (here: a file deleted after planning) never
    drops a file: what was not read yet ends as errors saying why."""
    for name in ("a.wav", "b.wav", "c.wav"):
        (tmp_path / name).write_bytes(encode(sine(0.5), 16_000, "wav"))
    predictor = Predictor(
        PredictConfig((str(tmp_path),), options=LabelingOptions(model=str(tiny_hf_checkpoint)))
    )
    plan = predictor.plan()
    os.remove(tmp_path / "b.wav")
    results = list(predictor.label(plan.units))
    assert [(r.key, r.error is None) for r in results] == [
        (str(tmp_path / "a.wav"), True),
        (str(tmp_path / "b.wav"), False),
        (str(tmp_path / "c.wav"), False),
    ]
    assert "not found" in results[1].error


@pytest.mark.slow
def test_predict_scores_equal_run_scores_on_the_same_files(
    ray_local, clips, tmp_path, tiny_hf_checkpoint
):
    write_tar_shard(
        clips / "shard-000000.tar",
        [("x.wav", encode(sine(3.0, freq=500.0), 16_000, "wav")), ("x.json", b"{}")],
    )
    output = tmp_path / "labels"
    result = CliRunner().invoke(
        main, ["run", str(clips), "--output", str(output), "--model", str(tiny_hf_checkpoint)]
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(output, columns=["shard", "key", "window_index", "scores", "error"])
    run_rows = {(row["key"], row["window_index"]): row for row in table.to_pylist()}

    code, stdout, _ = predict(
        str(clips), "--json", "--scores", "--windows", model=tiny_hf_checkpoint
    )
    assert code == 1  # broken.wav
    predicted = {(r["key"], r.get("window_index", 0)): r for r in json_lines(stdout)}
    assert predicted.keys() == run_rows.keys()
    for at, record in predicted.items():
        row = run_rows[at]
        if "error" in record:
            assert record["error"] == row["error"]
            continue
        assert row["error"] is None
        np.testing.assert_allclose(
            list(record["scores"].values()), row["scores"], atol=SCORE_TOLERANCE, err_msg=str(at)
        )
