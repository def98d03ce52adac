"""Corpus fbank statistics: torchaudio's Kaldi fbank over the real frames of every window."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from audio_corpus import encode, write_tar_shard
from click.testing import CliRunner

from pipeline.commands.cli_labeling import norm_stats_command
from pipeline.commands.norm_stats import compute_norm_stats
from pipeline.errors import UserError
from pipeline.normalisation import NormStats, NormStatsError

WINDOW_SAMPLES = 163_840  # 10.24 s at 16 kHz: the model's input, as the pipeline cuts windows
MIN_WINDOW_SAMPLES = 400  # one 25 ms frame


def noise_clip(seconds: float, seed: int, amplitude: float = 0.3) -> np.ndarray:
    """Noise with a rising envelope, so the statistics depend on every frame."""
    rng = np.random.default_rng(seed)
    count = int(seconds * 16_000)
    envelope = np.linspace(0.05, 0.9, count, dtype=np.float32)
    return (amplitude * rng.standard_normal(count)).astype(np.float32) * envelope


def reference_norm_stats(waveforms: list[np.ndarray]) -> tuple[float, float, int]:
    """(mean, std, frames) straight from torchaudio's Kaldi fbank with AST's settings, one
    10.24 s window at a time (a final window under 400 samples has no frame), no padding."""
    fbanks = []
    for waveform in waveforms:
        for start in range(0, len(waveform), WINDOW_SAMPLES):
            window = waveform[start : start + WINDOW_SAMPLES]
            if len(window) < MIN_WINDOW_SAMPLES:
                continue
            fbank = torchaudio.compliance.kaldi.fbank(
                torch.from_numpy(np.ascontiguousarray(window))[None],
                sample_frequency=16_000,
                window_type="hanning",
                num_mel_bins=128,
                htk_compat=True,
                use_energy=False,
                dither=0.0,
                frame_shift=10,
            )
            fbanks.append(fbank.double().numpy())
    values = np.concatenate(fbanks)  # (frames, 128)
    return float(values.mean()), float(values.std()), values.shape[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of WAV files (one longer than a window, one just over a frame) and a tar shard,
    plus one undecodable file."""
    folder = tmp_path_factory.mktemp("norm-corpus")
    clips = {
        "long.wav": noise_clip(12.5, 1),  # two windows, the second 2.26 s
        # 800 samples: 3 frames; quiet, so its log-mel values lie far below 0.
        "short.wav": noise_clip(0.05, 2, amplitude=0.01),
        "mid.flac": noise_clip(1.7, 3),
    }
    for name, clip in clips.items():
        sf.write(folder / name, clip, 16_000, subtype="FLOAT" if name.endswith("wav") else "PCM_16")
    (folder / "broken.wav").write_bytes(b"RIFF not really a wav file")
    shard_clips = [noise_clip(2.0, 4), noise_clip(0.8, 5)]
    write_tar_shard(
        folder / "shard-000000.tar",
        [(f"s{i}.wav", encode(clip, 16_000, "wav", "FLOAT")) for i, clip in enumerate(shard_clips)],
    )
    # The reference reads back what was written (FLAC quantises to 16 bits).
    decoded = [sf.read(folder / name, dtype="float32")[0] for name in clips]
    return folder, decoded + shard_clips


@pytest.mark.slow
def test_norm_stats_equal_kaldi_fbank_over_real_frames(ray_local, corpus):
    folder, waveforms = corpus
    stats = compute_norm_stats([str(folder)], files_per_unit=2, echo=lambda line: None)
    mean, std, frames = reference_norm_stats(waveforms)
    assert stats.frames == frames  # padding rows are not counted
    assert stats.files == 5 and stats.errors == 1
    # compute_fbank matches torchaudio to ~1e-5 per value; pooled figures agree far closer.
    assert stats.mean == pytest.approx(mean, abs=1e-5)
    assert stats.std == pytest.approx(std, rel=1e-5)


@pytest.mark.slow
def test_norm_stats_differ_from_statistics_that_count_padding(ray_local, corpus):
    folder, waveforms = corpus
    stats = compute_norm_stats([str(folder / "short.wav")], echo=lambda line: None)
    real_mean, _, frames = reference_norm_stats([waveforms[1]])
    # The original repository's way: the whole 1024-frame input, zero rows included.
    padded_mean = real_mean * frames / 1024
    assert stats.frames == 3
    assert stats.mean == pytest.approx(real_mean, abs=1e-5)
    assert abs(stats.mean - padded_mean) > 1.0


def test_norm_stats_file_round_trips_locally_and_on_s3(s3_server, tmp_path):
    stats = NormStats(mean=-3.5, std=4.25, frames=10, files=2, errors=1, source=("s3://b/x.tar",))
    bucket = s3_server.create_bucket("norm-stats-roundtrip")
    for uri in (str(tmp_path / "deep" / "stats.json"), f"{bucket}/stats/stats.json"):
        stats.save(uri)
        assert NormStats.load(uri) == stats
    written = json.loads((tmp_path / "deep" / "stats.json").read_text())
    assert {"mean", "std", "frames", "files", "errors", "source"} <= written.keys()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        (b"not json", "is not JSON"),
        (b'{"mean": -4.0}', 'numbers "mean" and "std"'),
        (b'{"mean": -4.0, "std": 0}', "std positive"),
        (b'{"mean": "NaN", "std": 1}', "mean must be finite"),
    ],
)
def test_unusable_norm_stats_file_fails_with_one_clear_line(tmp_path, content, message):
    path = tmp_path / "stats.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(NormStatsError, match=message) as raised:
        NormStats.load(str(path))
    assert isinstance(raised.value, UserError)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.slow
def test_norm_stats_command_writes_json_and_reports_missing_input(ray_local, corpus, tmp_path):
    folder, _ = corpus
    output = tmp_path / "out" / "stats.json"
    runner = CliRunner()
    result = runner.invoke(norm_stats_command, [str(folder / "mid.flac"), "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert NormStats.load(str(output)).files == 1

    missing = tmp_path / "nowhere" / "shard-000000.tar"
    result = runner.invoke(norm_stats_command, [str(missing), "--output", str(output)])
    assert result.exit_code == 2
    assert str(missing) in result.output
    assert "Traceback" not in result.output


def test_unwritable_norm_stats_output_fails_with_one_clear_line(s3_server, tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    stats = NormStats(mean=-3.5, std=4.25)
    for uri in (str(tmp_path / "a-file" / "stats.json"), "s3://no-such-bucket-here/stats.json"):
        with pytest.raises(NormStatsError, match="cannot write") as raised:
            stats.save(uri)
        assert uri in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.slow
def test_a_shard_gone_after_planning_exits_3_with_one_line(
    ray_local, corpus, tmp_path, monkeypatch
):
    # The read fails inside a Ray task: the driver must still see the store's fault (exit 3), not
    # a task error with a traceback (a bug's exit 1).
    import pipeline.commands.norm_stats as norm_stats

    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes((corpus[0] / "shard-000000.tar").read_bytes())
    plan = norm_stats.plan_work_units

    def plan_then_lose_the_shard(*args, **kwargs):
        planned = plan(*args, **kwargs)
        shard.unlink()
        return planned

    monkeypatch.setattr(norm_stats, "plan_work_units", plan_then_lose_the_shard)
    result = CliRunner().invoke(
        norm_stats_command, [str(shard), "--output", str(tmp_path / "stats.json")]
    )
    assert result.exit_code == 3, result.output
    assert str(shard) in result.output and "not found" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "stats.json").exists()
