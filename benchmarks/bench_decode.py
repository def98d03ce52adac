"""Decode cost per 10 s clip, one thread: FLAC and MP3 (libsndfile) vs M4A/AAC and WebM/Opus (PyAV).

    .venv/bin/python benchmarks/bench_decode.py [--seconds 10] [--repeats 20]

Each format holds the same audio-like stereo clip at the rate its sources usually have (44.1 kHz,
48 kHz for Opus). `decode_audio` is timed whole (bytes -> 16 kHz mono) and split into its two
parts: the decoder (bytes -> mono at the source rate) and the shared resampler. Figures are the
best of --repeats runs; ratios are against FLAC measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from timing import best_seconds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from audio_corpus import encode, encode_with_pyav  # noqa: E402

from pipeline import audio  # noqa: E402
from pipeline.formats import FFMPEG, LIBSNDFILE  # noqa: E402


def audio_like(seconds: float, sr: int) -> np.ndarray:
    """(frames, 2) float32: tones, a chirp and noise, slightly different per channel."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    mix = sum(0.15 * np.sin(2 * np.pi * f * t) for f in (220.0, 1375.0, 3100.0))
    mix += 0.2 * np.sin(2 * np.pi * (100 + 300 * t) * t)
    left = mix + 0.05 * rng.standard_normal(t.size)
    right = 0.8 * mix + 0.05 * rng.standard_normal(t.size)
    return np.stack([left, right], axis=1).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the resampler; FFmpeg decodes on one thread (audio.py)

    clip_44k = audio_like(args.seconds, 44_100)
    clip_48k = audio_like(args.seconds, 48_000)
    cases = [  # (name, extension, decoder, bytes, source rate)
        (
            "FLAC 16-bit",
            "flac",
            LIBSNDFILE,
            encode(clip_44k, 44_100, "FLAC", "PCM_16"),
            44_100,
        ),
        (
            "MP3",
            "mp3",
            LIBSNDFILE,
            encode(clip_44k, 44_100, "MP3", "MPEG_LAYER_III"),
            44_100,
        ),
        ("M4A/AAC", "m4a", FFMPEG, encode_with_pyav(clip_44k, 44_100, "ipod", "aac"), 44_100),
        (
            "WebM/Opus",
            "webm",
            FFMPEG,
            encode_with_pyav(clip_48k, 48_000, "webm", "libopus"),
            48_000,
        ),
    ]

    print(f"{args.seconds:g} s stereo clip, 1 thread, best of {args.repeats}")
    print(
        f"{'format':12s}{'kB':>6s}{'decode_audio':>15s}{'decoder':>11s}{'resample':>11s}"
        f"{'/ FLAC':>8s}"
    )
    reference = None
    for name, extension, decoder, data, rate in cases:
        whole, decoder_only, resample_only = time_decode(
            data, extension, decoder, rate, args.repeats
        )
        reference = reference or whole
        print(
            f"{name:12s}{len(data) / 1000:6.0f}{whole * 1000:12.2f} ms{decoder_only * 1000:8.2f} ms"
            f"{resample_only * 1000:8.2f} ms{whole / reference:7.2f}x"
        )


def time_decode(
    data: bytes, extension: str, decoder: str, rate: int, repeats: int
) -> tuple[float, float, float]:
    """Seconds for decode_audio, for its decoder alone, and for its resampler alone."""
    decode = audio._DECODERS[decoder]
    whole = best_seconds(lambda: audio.decode_audio(data, extension, 3600.0), repeats)
    decoder_only = best_seconds(lambda: decode(data, extension, 3600.0), repeats)
    mono, _ = decode(data, extension, 3600.0)
    resample_only = best_seconds(
        lambda: audio.resample(mono, rate, audio.TARGET_SAMPLE_RATE), repeats
    )
    return whole, decoder_only, resample_only


if __name__ == "__main__":
    main()
