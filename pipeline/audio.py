"""Decode one clip's bytes to 16 kHz mono float32, and cut it into model-sized windows.

The decode path bounds every size from the header before decoding anything: a poison clip that
claims a huge sample rate, thousands of channels or hours of audio is refused with a reason
instead of exhausting a worker's memory (Ray would restart the worker and retry the same batch
forever). `decode_audio` raises only `AudioError`; the caller turns it into an error row.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torchaudio

from pipeline.storage import error_reason

TARGET_SAMPLE_RATE = 16_000  # AST's feature extractor works at 16 kHz
MIN_SAMPLES = 400  # one 25 ms fbank frame at 16 kHz; shorter clips give zero frames
MIN_SOURCE_RATE = 1_000
MAX_SOURCE_RATE = 384_000
MAX_CHANNELS = 64
_BLOCK_FRAMES = 65_536  # decode in blocks: memory is the mono result, not frames x channels


class AudioError(Exception):
    """A clip that cannot be labeled; the message is the reason for its error row."""


@dataclass
class DecodedAudio:
    waveform: np.ndarray  # (N,) float32, mono, 16 kHz
    source_sample_rate: int
    duration_s: float  # of the decoded source audio


@dataclass
class Window:
    index: int
    start_s: float
    end_s: float  # actual covered end: shorter than start_s + window_s for a final partial window
    waveform: np.ndarray  # (n,) float32 view into the clip, n <= window samples


def decode_audio(data: bytes, audio_format: str | None, max_duration_s: float) -> DecodedAudio:
    """Decodes WAV (8/16/24/32-bit, float), FLAC, OGG/Vorbis or MP3 bytes to 16 kHz mono.

    `audio_format` (the file extension) only labels error messages: libsndfile recognises the
    container from its header, and soundfile refuses a format argument for anything but RAW.
    """
    what = f".{audio_format.lower()}" if audio_format else "audio"
    if not data:
        raise AudioError("empty file (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as sound:
            source_rate, channels, frames = sound.samplerate, sound.channels, sound.frames
            _check_header(source_rate, channels, frames, max_duration_s)
            mono = _read_mono(sound, max_frames=int(max_duration_s * source_rate) + 1)
    except AudioError:
        raise
    except sf.LibsndfileError as exc:
        # error_string drops soundfile's "Error opening <_io.BytesIO object at 0x...>" prefix.
        raise AudioError(f"cannot decode {what}: {exc.error_string}") from None
    except Exception as exc:
        raise AudioError(f"cannot decode {what}: {error_reason(exc)}") from None

    duration_s = len(mono) / source_rate
    if len(mono) == 0:
        raise AudioError("no audio frames")
    try:
        waveform = resample(mono, source_rate, TARGET_SAMPLE_RATE)
    except Exception as exc:
        raise AudioError(f"cannot resample from {source_rate} Hz: {error_reason(exc)}") from None
    if len(waveform) < MIN_SAMPLES:
        raise AudioError(f"too short: {duration_s * 1000:.1f} ms, needs at least 25 ms")
    return DecodedAudio(waveform, source_rate, duration_s)


def _check_header(sample_rate: int, channels: int, frames: int, max_duration_s: float) -> None:
    if not MIN_SOURCE_RATE <= sample_rate <= MAX_SOURCE_RATE:
        raise AudioError(
            f"unsupported sample rate {sample_rate} Hz "
            f"(accepted {MIN_SOURCE_RATE} to {MAX_SOURCE_RATE} Hz)"
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"unsupported channel count {channels} (accepted 1 to {MAX_CHANNELS})")
    if frames <= 0:
        raise AudioError("no audio frames")
    duration_s = frames / sample_rate
    if duration_s > max_duration_s:
        raise AudioError(f"too long: {duration_s:.1f} s, over the {max_duration_s:g} s limit")


def _read_mono(sound: sf.SoundFile, max_frames: int) -> np.ndarray:
    """(frames,) float32: the mean of the channels, decoded block by block."""
    blocks = []
    total = 0
    for block in sound.blocks(blocksize=_BLOCK_FRAMES, dtype="float32", always_2d=True):
        # block: (frames, channels)
        if not np.isfinite(block).all():
            # Not repaired: a file with NaN/Inf samples is broken, and its labels would be noise.
            raise AudioError("contains NaN/Inf samples")
        blocks.append(block.mean(axis=1, dtype=np.float32))
        total += len(block)
        # MP3 frame counts are estimates: keep a header that under-reports from running away.
        if total > max_frames:
            raise AudioError(
                f"too long: more than {max_frames / sound.samplerate:.1f} s of audio decoded"
            )
    if not blocks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(blocks)


def resample(waveform: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """(N,) float32 -> (ceil(N * new / orig),) float32 with torchaudio's sinc resampler."""
    if orig_rate == new_rate:
        return np.ascontiguousarray(waveform, dtype=np.float32)
    with torch.inference_mode():
        resampled = _resampler(orig_rate, new_rate)(torch.from_numpy(waveform))
    return resampled.numpy()


@functools.lru_cache(maxsize=16)
def _resampler(orig_rate: int, new_rate: int) -> torchaudio.transforms.Resample:
    # The transform computes the sinc kernel once; torchaudio.functional.resample (same numbers,
    # same defaults) would rebuild it for every clip.
    return torchaudio.transforms.Resample(orig_rate, new_rate, dtype=torch.float32)


def cut_windows(
    waveform: np.ndarray,
    window_s: float = 10.24,
    hop_s: float | None = None,
    sample_rate: int = TARGET_SAMPLE_RATE,
) -> list[Window]:
    """Windows of `window_s` every `hop_s` (default: back to back) over a (N,) waveform.

    A final partial window is kept when it holds at least 25 ms (400 samples at 16 kHz), or when
    it is the clip's only window. Windows stop once one reaches the end of the clip, so an
    overlapping hop never yields a window that lies inside the previous one.
    """
    window = round(window_s * sample_rate)
    hop = window if hop_s is None else round(hop_s * sample_rate)
    if window <= 0 or hop <= 0:
        raise ValueError(f"window_s and hop_s must be positive, got {window_s}, {hop_s}")
    min_samples = round(MIN_SAMPLES * sample_rate / TARGET_SAMPLE_RATE)
    total = len(waveform)
    windows: list[Window] = []
    start = 0
    while start < total:
        end = min(start + window, total)
        if end - start >= min_samples or not windows:
            windows.append(
                Window(len(windows), start / sample_rate, end / sample_rate, waveform[start:end])
            )
        if start + window >= total:
            break
        start += hop
    return windows
