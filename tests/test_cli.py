"""The `ast-label` command line: predict on real files, and one-line errors before any Ray work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from audio_corpus import encode, sine
from click.testing import CliRunner
from conftest import TINY_LABELS

from ast_model.checkpoint import load_checkpoint
from ast_model.features import FbankConfig, compute_fbank
from ast_model.labels import scores_from_logits
from pipeline.cli import main


@pytest.fixture()
def clips(tmp_path):
    files = {
        "stereo-44k.wav": encode(sine(2.0, sr=44_100, channels=2, freq=300.0), 44_100, "wav"),
        "tone.flac": encode(sine(1.0, sr=16_000, freq=1_000.0), 16_000, "flac"),
        "long.ogg": encode(sine(12.0, sr=22_050, freq=700.0), 22_050, "ogg"),
        "broken.wav": b"this is not audio" * 50,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_predict_prints_top_labels_per_file_and_reports_unreadable_ones(clips, tiny_hf_checkpoint):
    names = ["stereo-44k.wav", "broken.wav", "tone.flac"]
    result = CliRunner().invoke(
        main,
        [
            "predict",
            *[str(clips / n) for n in names],
            "--model",
            str(tiny_hf_checkpoint),
            "-k",
            "3",
        ],
    )
    assert result.exit_code == 1
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        str(clips / "stereo-44k.wav"),
        str(clips / "tone.flac"),
    ]
    assert all(len(line.split(": ", 1)[1].split(", ")) == 3 for line in lines)
    assert "broken.wav: cannot label: cannot decode" in result.stderr
    assert "Traceback" not in result.output


def test_predict_json_scores_equal_the_model_on_the_same_audio(clips, tiny_hf_checkpoint):
    path = clips / "tone.flac"
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(path),
            "--model",
            str(tiny_hf_checkpoint),
            "--json",
            "--scores",
            "--embedding",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert set(record) == {"path", "top_labels", "top_scores", "scores", "embedding", "windows"}
    loaded = load_checkpoint(str(tiny_hf_checkpoint))
    # FLAC stores 16-bit samples: compare with the decoded file, not the float sine.
    decoded, _ = sf.read(path, dtype="float32")
    wave = torch.from_numpy(decoded)[None, :]
    with torch.inference_mode():
        output = loaded.model(
            compute_fbank(wave, torch.tensor([wave.shape[1]]), FbankConfig.for_model(loaded.config))
        )
    expected = scores_from_logits(output.logits, loaded.config.multi_label)[0].numpy()
    np.testing.assert_allclose(record["scores"], expected, atol=1e-5)
    assert record["top_labels"][0] == TINY_LABELS[int(np.argmax(expected))]
    assert len(record["embedding"]) == loaded.config.hidden_size


def test_predict_averages_the_windows_of_a_long_file(clips, tiny_hf_checkpoint):
    result = CliRunner().invoke(
        main, ["predict", str(clips / "long.ogg"), "--model", str(tiny_hf_checkpoint), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["windows"] == 2  # 12 s -> 10.24 s + 1.76 s


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["run", "{tmp}/missing/*.tar", "--output", "{tmp}/out"], "missing"),
        (["run", "{tmp}", "--output", "{tmp}/out", "--model", "{tmp}/no-model"], "no-model"),
        (["run", "{tmp}", "--output", "{tmp}/out", "--top-k", "0"], "--top-k"),
        (["run", "{tmp}", "--output", "{tmp}/out", "--precision", "fp8"], "--precision"),
        (["run", "{tmp}", "--output", "{tmp}/out", "--device", "cuda"], "no usable GPU"),
        (["predict", "{tmp}/x.wav", "--model", "{tmp}/no-model"], "no-model"),
    ],
)
def test_user_errors_print_one_line_and_exit_non_zero(
    tmp_path, tiny_hf_checkpoint, arguments, message
):
    filled = [a.format(tmp=tmp_path) for a in arguments]
    if "--model" not in filled:
        filled += ["--model", str(tiny_hf_checkpoint)]
    result = CliRunner().invoke(main, filled)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, result.output


def test_help_lists_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("predict", "run", "demo", "submit", "status", "stop"):
        assert command in result.output
