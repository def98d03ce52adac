"""Decoding every supported format, rate and bit depth to 16 kHz mono; windowing; bad bytes.

Every file is real: written by libsndfile (soundfile) or by FFmpeg (PyAV) in the test itself.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import av
import numpy as np
import pytest
import torch
import torchaudio
from audio_corpus import encode, encode_with_pyav, remux, sine, video_with_audio, wav_bytes

from ast_model.config import FbankConfig
from pipeline.audio import AudioError, cut_windows, decode_audio, resample
from pipeline.formats import (
    AUDIO_EXTENSIONS,
    FFMPEG,
    audio_format_of,
    decoders_for,
    extension_of,
)

MAX_S = 60.0
WINDOW_S = FbankConfig().input_seconds  # the model's input: 10.24 s


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
    cuts = (1, 12, 44, 100, len(data) // 3, len(data) - 1)
    assert_damage_is_an_audio_error_or_finite(damaged(data, cuts, seed=7, keep_head=0), fmt)


def damaged(data: bytes, cuts: tuple[int, ...], seed: int, keep_head: int) -> list[bytes]:
    """The file cut at each of `cuts`, and six copies with 20 random bytes flipped (past the
    first `keep_head` bytes)."""
    rng = np.random.default_rng(seed)
    variants = [data[:cut] for cut in cuts]
    for _ in range(6):
        flipped = bytearray(data)
        for position in rng.integers(keep_head, len(data), size=20):
            flipped[position] ^= 0xFF
        variants.append(bytes(flipped))
    return variants


def assert_damage_is_an_audio_error_or_finite(variants: list[bytes], fmt: str) -> None:
    for variant in variants:
        try:
            decoded = decode_audio(variant, fmt, MAX_S)
        except AudioError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            assert np.isfinite(decoded.waveform).all() and len(decoded.waveform) >= 400


def test_windows_are_back_to_back_and_keep_the_partial_tail():
    clip = np.arange(25 * 16_000, dtype=np.float32)  # 25 s
    windows = cut_windows(clip, WINDOW_S)
    assert [(w.index, w.start_s, w.end_s) for w in windows] == [
        (0, 0.0, 10.24),
        (1, 10.24, 20.48),
        (2, 20.48, 25.0),
    ]
    assert [len(w.waveform) for w in windows] == [163_840, 163_840, 72_320]
    assert windows[2].waveform[0] == 20.48 * 16_000


def test_tail_shorter_than_one_frame_is_dropped_unless_it_is_all_there_is():
    assert len(cut_windows(np.zeros(163_840 + 399, np.float32), WINDOW_S)) == 1
    assert len(cut_windows(np.zeros(163_840 + 400, np.float32), WINDOW_S)) == 2
    (only,) = cut_windows(np.zeros(100, np.float32), WINDOW_S)
    assert (only.start_s, only.end_s, len(only.waveform)) == (0.0, 100 / 16_000, 100)
    assert cut_windows(np.zeros(0, np.float32), WINDOW_S) == []


def test_overlapping_hop_stops_once_a_window_reaches_the_end():
    windows = cut_windows(np.zeros(20 * 16_000, np.float32), window_s=10.0, hop_s=5.0)
    assert [(w.start_s, w.end_s) for w in windows] == [(0.0, 10.0), (5.0, 15.0), (10.0, 20.0)]


def test_exact_multiple_gives_only_full_windows():
    windows = cut_windows(np.zeros(2 * 163_840, np.float32), WINDOW_S)
    assert [(w.start_s, w.end_s) for w in windows] == [(0.0, 10.24), (10.24, 20.48)]


# ---------------------------------------------------------------------------------------------
# Every accepted extension, through the decoder the format table names for it


def by_libsndfile(fmt: str, subtype: str, channels: int = 1) -> Callable[[int], bytes]:
    """An encoder of a 1 s 440 Hz tone at a given rate, with soundfile (fmt: its major format)."""

    def make(sr: int) -> bytes:
        return encode(sine(1.0, sr, channels), sr, fmt, subtype)

    return make


def by_ffmpeg(
    container: str, codec: str, channels: int = 1, options: dict[str, str] | None = None
) -> Callable[[int], bytes]:
    """The same, encoded by FFmpeg through PyAV (container: an FFmpeg muxer)."""
    return lambda sr: encode_with_pyav(sine(1.0, sr, channels), sr, container, codec, options)


def remuxed(fmt: str, subtype: str, container: str, channels: int = 2) -> Callable[[int], bytes]:
    """libsndfile's packets (FLAC, Vorbis) copied into an FFmpeg container."""
    return lambda sr: remux(encode(sine(1.0, sr, channels), sr, fmt, subtype), container)


# Fragmented MP4 (an empty moov, then moof/mdat pairs) is how YouTube's DASH audio arrives.
FRAGMENTED = {"movflags": "frag_keyframe+empty_moov"}


def _m4a(duration_s: float = 1.0) -> bytes:
    return encode_with_pyav(sine(duration_s, 44_100, 2), 44_100, "ipod", "aac")


def _webm(duration_s: float = 1.0, options: dict[str, str] | None = None) -> bytes:
    return encode_with_pyav(sine(duration_s, 48_000, 2), 48_000, "webm", "libopus", options)


def _first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _with_nan() -> bytes:
    tone = sine(0.5, 16_000)
    tone[1234] = np.nan
    return encode_with_pyav(tone, 16_000, "matroska", "pcm_f32le")


# One sample per accepted extension at least: (extension, encoder, source rate, lossy).
ACCEPTED_SAMPLES = [
    pytest.param("wav", by_libsndfile("WAV", "PCM_16", 2), 44_100, False, id="wav-16"),
    pytest.param("wav", by_libsndfile("WAV", "ULAW"), 8_000, False, id="wav-ulaw"),
    pytest.param("flac", by_libsndfile("FLAC", "PCM_16", 2), 48_000, False, id="flac"),
    pytest.param("mp3", by_libsndfile("MP3", "MPEG_LAYER_III"), 22_050, True, id="mp3"),
    pytest.param("ogg", by_libsndfile("OGG", "VORBIS", 2), 44_100, True, id="ogg-vorbis"),
    pytest.param("oga", by_libsndfile("OGG", "VORBIS"), 32_000, True, id="oga-vorbis"),
    pytest.param("opus", by_libsndfile("OGG", "OPUS", 2), 48_000, True, id="opus"),
    pytest.param("aif", by_libsndfile("AIFF", "PCM_24"), 96_000, False, id="aif-24"),
    pytest.param("aiff", by_libsndfile("AIFF", "PCM_16", 2), 44_100, False, id="aiff-16"),
    pytest.param("aifc", by_libsndfile("AIFF", "ALAW"), 8_000, False, id="aifc-alaw"),
    pytest.param("aifc", by_libsndfile("AIFF", "ULAW", 2), 16_000, False, id="aifc-ulaw"),
    pytest.param("aifc", by_libsndfile("AIFF", "FLOAT"), 22_050, False, id="aifc-float"),
    pytest.param("au", by_libsndfile("AU", "PCM_16"), 11_025, False, id="au-16"),
    pytest.param("au", by_libsndfile("AU", "ULAW"), 8_000, False, id="au-ulaw"),
    pytest.param("caf", by_libsndfile("CAF", "ALAC_16", 2), 44_100, False, id="caf-alac"),
    pytest.param("caf", by_libsndfile("CAF", "PCM_24"), 48_000, False, id="caf-24"),
    pytest.param("w64", by_libsndfile("W64", "PCM_32"), 44_100, False, id="w64-32"),
    pytest.param("sph", by_libsndfile("NIST", "PCM_16"), 16_000, False, id="sph-16"),
    pytest.param("m4a", by_ffmpeg("ipod", "aac", 2), 44_100, True, id="m4a-aac"),
    pytest.param("m4a", by_ffmpeg("mp4", "aac", 2, FRAGMENTED), 48_000, True, id="m4a-dash"),
    pytest.param("mp4", by_ffmpeg("mp4", "aac"), 22_050, True, id="mp4-aac"),
    pytest.param("aac", by_ffmpeg("adts", "aac"), 32_000, True, id="aac-adts"),
    pytest.param("webm", by_ffmpeg("webm", "libopus", 2), 48_000, True, id="webm-opus"),
    pytest.param("webm", remuxed("ogg", "VORBIS", "webm"), 44_100, True, id="webm-vorbis"),
    pytest.param("mka", remuxed("flac", "PCM_24", "matroska"), 96_000, False, id="mka-flac-24"),
    pytest.param("mkv", by_ffmpeg("matroska", "aac"), 24_000, True, id="mkv-aac"),
    pytest.param("wma", by_ffmpeg("asf", "wmav2", 2), 44_100, True, id="wma"),
]


def test_every_accepted_extension_has_a_real_sample_here():
    assert sorted({sample.values[0] for sample in ACCEPTED_SAMPLES}) == sorted(AUDIO_EXTENSIONS)


@pytest.mark.parametrize(("extension", "make", "sr", "lossy"), ACCEPTED_SAMPLES)
def test_every_accepted_format_decodes_to_16k_mono_and_keeps_the_tone(extension, make, sr, lossy):
    decoded = decode_audio(make(sr), extension, MAX_S)

    assert decoded.waveform.dtype == np.float32 and decoded.waveform.ndim == 1
    assert decoded.source_sample_rate == sr
    # Lossy codecs add priming and padding: AAC up to two 1024-sample frames, WMA drops a few ms.
    assert decoded.duration_s == pytest.approx(1.0, abs=0.06 if lossy else 1e-9)
    assert len(decoded.waveform) == math.ceil(decoded.duration_s * 16_000)
    assert abs(peak_hz(decoded.waveform) - 440.0) <= 2.0  # 1 Hz FFT bins
    rms = float(np.sqrt(np.mean(decoded.waveform[1600:-1600] ** 2)))
    assert rms == pytest.approx(0.5 / math.sqrt(2), rel=0.1 if lossy else 0.03)


def test_the_extension_picks_the_decoder_and_names_outside_the_table_are_not_audio():
    assert audio_format_of("s3://bucket/clips/yt-abc.M4A") == "m4a"
    assert audio_format_of("clip.seg.webm") == "webm"
    assert audio_format_of("notes.txt") is None and audio_format_of("README") is None
    assert decoders_for("M4A") == (FFMPEG,)
    assert decoders_for(".opus")[-1] == FFMPEG  # Ogg holds codecs libsndfile lacks
    assert decoders_for(None) == decoders_for("bin") == ("libsndfile", FFMPEG)


def test_libsndfile_and_ffmpeg_give_the_same_waveform_for_the_same_flac_stream():
    """The same FLAC packets, in a .flac (libsndfile) and in Matroska (FFmpeg): one downmix,
    one integer scale, one resampler."""
    rng = np.random.default_rng(3)
    left, right = sine(1.0, 44_100, freq=440.0), sine(1.0, 44_100, freq=1000.0, amplitude=0.3)
    noisy = np.stack([left, right], axis=1) + 0.01 * rng.standard_normal((44_100, 2))
    flac = encode(noisy.astype(np.float32), 44_100, "flac", "PCM_24")

    by_libsndfile = decode_audio(flac, "flac", MAX_S)
    by_ffmpeg = decode_audio(remux(flac, "matroska"), "mka", MAX_S)

    assert by_ffmpeg.source_sample_rate == by_libsndfile.source_sample_rate == 44_100
    np.testing.assert_allclose(by_ffmpeg.waveform, by_libsndfile.waveform, atol=1e-6)


def test_ffmpeg_path_averages_the_channels():
    left = sine(0.5, 16_000, freq=440.0)
    silent_right = np.stack([left, np.zeros_like(left)], axis=1)
    data = remux(encode(silent_right, 16_000, "flac", "PCM_16"), "matroska")
    decoded = decode_audio(data, "mka", MAX_S)
    np.testing.assert_allclose(decoded.waveform, left / 2, atol=1 / 32_768)  # 16-bit steps


def test_ffmpeg_path_resamples_with_the_same_resampler():
    data = _webm()
    with av.open(io.BytesIO(data)) as container:
        planes = [frame.to_ndarray() for frame in container.decode(audio=0)]  # (2, n) fltp
    mono_48k = np.concatenate(planes, axis=1).mean(axis=0, dtype=np.float32)

    decoded = decode_audio(data, "webm", MAX_S)

    np.testing.assert_allclose(decoded.waveform, resample(mono_48k, 48_000, 16_000), atol=1e-6)


def test_a_video_contributes_its_first_audio_stream():
    tracks = [sine(1.0, 44_100, freq=440.0), sine(1.0, 44_100, freq=1000.0)]
    decoded = decode_audio(video_with_audio(tracks, 44_100, 1.0), "mp4", MAX_S)
    assert abs(peak_hz(decoded.waveform) - 440.0) <= 2.0
    # A video whose sound ends early is not "truncated": the file's duration is the video's.
    short_sound = video_with_audio([sine(0.4, 44_100)], 44_100, 3.0, "matroska")
    assert decode_audio(short_sound, "mkv", MAX_S).duration_s == pytest.approx(0.4, abs=0.05)


@pytest.mark.parametrize(
    ("make", "audio_format"),
    [
        (lambda: encode(sine(1.0, 44_100, 2), 44_100, "wav"), None),
        (lambda: encode(sine(1.0, 44_100, 2), 44_100, "flac"), ""),
        (_m4a, "bin"),
        (_webm, None),
    ],
    ids=["wav-no-extension", "flac-empty-extension", "m4a-named-bin", "webm-no-extension"],
)
def test_an_unknown_or_missing_extension_is_sniffed(make, audio_format):
    decoded = decode_audio(make(), audio_format, MAX_S)
    assert decoded.duration_s == pytest.approx(1.0, abs=0.06)
    assert abs(peak_hz(decoded.waveform) - 440.0) <= 2.0


@pytest.mark.parametrize(
    ("make", "audio_format"),
    [
        (lambda: remux(encode(sine(1.0, 44_100, 2), 44_100, "flac"), "ogg"), "ogg"),
        (_webm, "opus"),
    ],
    ids=["flac-in-ogg", "webm-named-opus"],
)
def test_what_libsndfile_cannot_open_in_an_ogg_or_opus_file_goes_to_ffmpeg(make, audio_format):
    decoded = decode_audio(make(), audio_format, MAX_S)
    assert decoded.duration_s == pytest.approx(1.0, abs=0.01)
    assert abs(peak_hz(decoded.waveform) - 440.0) <= 2.0


TEXT = b"Just some notes, not a recording.\n" * 20
NOT_AUDIO = "not an audio file, or a format neither libsndfile nor FFmpeg decodes"
CUT_SHORT = "FFmpeg: Invalid data found when processing input"


@pytest.mark.parametrize(
    ("make", "audio_format", "max_s", "reason"),
    [
        pytest.param(lambda: b"", "m4a", MAX_S, "empty file (0 bytes)", id="empty"),
        pytest.param(
            lambda: _m4a(2.0), "m4a", 1.5, "too long: 2.0 s, over the 1.5 s limit", id="m4a-long"
        ),
        pytest.param(lambda: _webm(2.0), "webm", 1.5, "too long: 2.0 s, over the", id="webm-long"),
        # A live WebM states no duration: the limit holds while decoding.
        pytest.param(
            lambda: _webm(2.0, {"live": "1"}),
            "webm",
            1.5,
            "too long: more than 1.5 s of audio decoded",
            id="webm-without-duration-long",
        ),
        pytest.param(
            lambda: _first_half(_m4a()),
            "m4a",
            MAX_S,
            f"cannot decode .m4a: {CUT_SHORT}",
            id="m4a-cut",
        ),
        pytest.param(
            lambda: encode_with_pyav(sine(1.0, 44_100), 44_100, "mp4", "aac", FRAGMENTED)[:-3000],
            "m4a",
            MAX_S,
            f"cannot decode .m4a: {CUT_SHORT}",
            id="m4a-dash-cut",
        ),
        pytest.param(
            lambda: _first_half(_webm()),
            "webm",
            MAX_S,
            "truncated: the header says 1.01 s, only 0.",
            id="webm-cut",
        ),
        pytest.param(
            lambda: np.random.default_rng(0).bytes(5000),
            "m4a",
            MAX_S,
            f"cannot decode .m4a: {CUT_SHORT}",
            id="random-bytes-m4a",
        ),
        pytest.param(lambda: TEXT, None, MAX_S, f"{NOT_AUDIO} (no extension)", id="text"),
        pytest.param(lambda: TEXT, "txt", MAX_S, f"{NOT_AUDIO} (.txt)", id="text-txt"),
        pytest.param(
            lambda: TEXT,
            "opus",
            MAX_S,
            "cannot decode .opus: Format not recognised",
            id="text-opus",
        ),
        pytest.param(
            lambda: video_with_audio([], 44_100, 1.0),
            "mp4",
            MAX_S,
            "cannot decode .mp4: no audio stream",
            id="video-without-sound",
        ),
        pytest.param(
            lambda: encode_with_pyav(sine(0.5, 999), 999, "matroska", "pcm_s16le"),
            "mka",
            MAX_S,
            "unsupported sample rate 999 Hz",
            id="rate-999",
        ),
        pytest.param(_with_nan, "mka", MAX_S, "contains NaN/Inf samples", id="nan"),
        pytest.param(
            lambda: encode_with_pyav(sine(0.02, 48_000), 48_000, "webm", "libopus"),
            "webm",
            MAX_S,
            "too short: ",
            id="too-short",
        ),
    ],
)
def test_bad_input_raises_audio_error_with_a_one_line_reason(make, audio_format, max_s, reason):
    with pytest.raises(AudioError) as caught:
        decode_audio(make(), audio_format, max_s)
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message and "<none>" not in message and len(message) < 300


def test_a_concat_list_cannot_make_ffmpeg_read_other_files(tmp_path, monkeypatch):
    """FFmpeg's concat and playlist demuxers open the files a list names; only audio demuxers
    may read clip bytes, or a "clip" could pull in any file the worker can read."""
    (tmp_path / "secret.wav").write_bytes(encode(sine(1.0), 16_000))
    monkeypatch.chdir(tmp_path)
    playlist = b"ffconcat version 1.0\nfile secret.wav\n"
    for audio_format in ("m4a", "bin", None):
        with pytest.raises(AudioError, match="cannot decode|not an audio file"):
            decode_audio(playlist, audio_format, MAX_S)


@pytest.mark.parametrize("make", [_m4a, _webm], ids=["m4a", "webm"])
def test_damaged_ffmpeg_files_never_raise_anything_but_audio_error(make, capfd):
    data = make()
    cuts = (1, 16, 100, len(data) // 3, len(data) - 1)
    variants = damaged(data, cuts, seed=11, keep_head=100)
    assert_damage_is_an_audio_error_or_finite(variants, make.__name__[1:])
    # FFmpeg's own log lines (its default callback writes to stderr) stay off the terminal.
    assert capfd.readouterr().err == ""


def test_extension_of_names_any_last_extension_audio_or_not():
    assert extension_of("s3://bucket/notes.TXT") == "txt"
    assert extension_of("clip.seg.M4A") == "m4a"
    assert extension_of("folder.v2/README") is None and extension_of("trailing.") is None
