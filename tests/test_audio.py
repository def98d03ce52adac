"""Decoding every supported format, rate and bit depth to 16 kHz mono; windowing; bad bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchaudio
from audio_corpus import encode, sine, wav_bytes

from pipeline.audio import AudioError, cut_windows, decode_audio, resample

MAX_S = 60.0


def peak_hz(waveform: np.ndarray, sample_rate: int = 16_000) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.fft.rfftfreq(len(waveform), 1 / sample_rate)[np.argmax(spectrum)])


@pytest.mark.parametrize(
    ("fmt", "subtype", "sr", "channels"),
    [
        ("wav", "PCM_U8", 16_000, 1),
        ("wav", "PCM_16", 16_000, 1),
        ("wav", "PCM_24", 48_000, 1),
        ("wav", "PCM_32", 22_050, 1),
        ("wav", "FLOAT", 16_000, 1),
        ("wav", "DOUBLE", 8_000, 1),
        ("wav", "PCM_16", 44_100, 2),
        ("wav", "PCM_16", 96_000, 1),
        ("wav", "PCM_16", 8_000, 6),
        ("flac", "PCM_16", 44_100, 2),
        ("flac", "PCM_24", 96_000, 1),
        ("ogg", "VORBIS", 44_100, 2),
        ("ogg", "VORBIS", 16_000, 1),
        ("mp3", "MPEG_LAYER_III", 44_100, 2),
        ("mp3", "MPEG_LAYER_III", 16_000, 1),
    ],
)
def test_every_format_decodes_to_16k_mono_and_keeps_the_tone(fmt, subtype, sr, channels):
    duration_s = 1.0
    data = encode(sine(duration_s, sr=sr, channels=channels, freq=440.0), sr, fmt, subtype)

    decoded = decode_audio(data, fmt, MAX_S)

    assert decoded.waveform.dtype == np.float32 and decoded.waveform.ndim == 1
    assert decoded.source_sample_rate == sr
    lossy = fmt in ("mp3", "ogg")  # encoders add priming/padding frames
    assert decoded.duration_s == pytest.approx(duration_s, abs=0.06 if lossy else 1e-9)
    assert len(decoded.waveform) == math.ceil(decoded.duration_s * 16_000)
    assert abs(peak_hz(decoded.waveform) - 440.0) <= 2.0  # 1 Hz FFT bins
    # The amplitude survives downmixing and resampling (identical channels; lossy codecs +-10%).
    rms = float(np.sqrt(np.mean(decoded.waveform[1600:-1600] ** 2)))
    assert rms == pytest.approx(0.5 / math.sqrt(2), rel=0.1 if lossy else 0.02)


def test_channels_are_averaged():
    left = sine(0.5, sr=16_000, freq=440.0)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    decoded = decode_audio(encode(stereo, 16_000, "wav", "FLOAT"), "wav", MAX_S)
    np.testing.assert_allclose(decoded.waveform, left / 2, atol=1e-7)


def test_resampling_matches_torchaudio_functional_resample():
    tone = sine(0.7, sr=44_100, freq=1000.0)
    expected = torchaudio.functional.resample(torch.from_numpy(tone), 44_100, 16_000).numpy()
    np.testing.assert_allclose(resample(tone, 44_100, 16_000), expected, atol=1e-6)
    decoded = decode_audio(encode(tone, 44_100, "wav", "FLOAT"), "wav", MAX_S)
    np.testing.assert_allclose(decoded.waveform, expected, atol=1e-6)


def test_16k_audio_is_passed_through_unchanged():
    tone = sine(0.5, sr=16_000)
    decoded = decode_audio(encode(tone, 16_000, "wav", "FLOAT"), "wav", MAX_S)
    np.testing.assert_array_equal(decoded.waveform, tone)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"plain text pretending to be audio\n" * 10, "cannot decode .wav: Format not recognised"),
        (wav_bytes(2_000_000_000, 1, bytes(3200)), "unsupported sample rate 2000000000 Hz"),
        (wav_bytes(999, 1, bytes(3200)), "unsupported sample rate 999 Hz"),
        (wav_bytes(16_000, 65, bytes(65 * 2 * 100)), "unsupported channel count 65"),
        (wav_bytes(16_000, 1, b""), "no audio frames"),
        (encode(sine(61.0, 1_000), 1_000, "wav", "PCM_U8"), "too long: 61.0 s, over the 60 s"),
        (encode(sine(0.024), 16_000, "wav"), "too short: 24.0 ms, needs at least 25 ms"),
    ],
)
def test_bad_audio_raises_audio_error_with_a_reason(data, reason):
    with pytest.raises(AudioError) as caught:
        decode_audio(data, "wav", MAX_S)
    assert reason in str(caught.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_samples_are_refused_not_repaired(bad):
    tone = sine(0.5)
    tone[1234] = bad
    with pytest.raises(AudioError, match="contains NaN/Inf samples"):
        decode_audio(encode(tone, 16_000, "wav", "FLOAT"), "wav", MAX_S)


def test_the_shortest_accepted_clip_is_one_fbank_frame():
    decoded = decode_audio(encode(sine(0.025), 16_000, "wav"), "wav", MAX_S)
    assert len(decoded.waveform) == 400


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
def test_damaged_files_never_raise_anything_but_audio_error(fmt):
    """Cut and bit-flipped files either decode to finite samples or fail with AudioError."""
    data = encode(sine(0.5, sr=22_050), 22_050, fmt)
    rng = np.random.default_rng(7)
    variants = [data[:cut] for cut in (1, 12, 44, 100, len(data) // 3, len(data) - 1)]
    for _ in range(6):
        flipped = bytearray(data)
        for position in rng.integers(0, len(data), size=20):
            flipped[position] ^= 0xFF
        variants.append(bytes(flipped))
    for variant in variants:
        try:
            decoded = decode_audio(variant, fmt, MAX_S)
        except AudioError as exc:
            assert str(exc)
        else:
            assert np.isfinite(decoded.waveform).all() and len(decoded.waveform) >= 400


def test_windows_are_back_to_back_and_keep_the_partial_tail():
    clip = np.arange(25 * 16_000, dtype=np.float32)  # 25 s
    windows = cut_windows(clip)
    assert [(w.index, w.start_s, w.end_s) for w in windows] == [
        (0, 0.0, 10.24),
        (1, 10.24, 20.48),
        (2, 20.48, 25.0),
    ]
    assert [len(w.waveform) for w in windows] == [163_840, 163_840, 72_320]
    assert windows[2].waveform[0] == 20.48 * 16_000


def test_tail_shorter_than_one_frame_is_dropped_unless_it_is_all_there_is():
    assert len(cut_windows(np.zeros(163_840 + 399, np.float32))) == 1
    assert len(cut_windows(np.zeros(163_840 + 400, np.float32))) == 2
    (only,) = cut_windows(np.zeros(100, np.float32))
    assert (only.start_s, only.end_s, len(only.waveform)) == (0.0, 100 / 16_000, 100)
    assert cut_windows(np.zeros(0, np.float32)) == []


def test_overlapping_hop_stops_once_a_window_reaches_the_end():
    windows = cut_windows(np.zeros(20 * 16_000, np.float32), window_s=10.0, hop_s=5.0)
    assert [(w.start_s, w.end_s) for w in windows] == [(0.0, 10.0), (5.0, 15.0), (10.0, 20.0)]


def test_exact_multiple_gives_only_full_windows():
    windows = cut_windows(np.zeros(2 * 163_840, np.float32))
    assert [(w.start_s, w.end_s) for w in windows] == [(0.0, 10.24), (10.24, 20.48)]
