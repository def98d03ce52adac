"""Decode one clip's bytes to 16 kHz mono float32, and cut it into model-sized windows.

Two decoders, picked by the extension (`pipeline.formats`): libsndfile for what it reads (WAV,
FLAC, MP3, Ogg, AIFF, CAF, ...), FFmpeg through PyAV for the rest (M4A/AAC, WebM/Opus, ...);
both end in the same downmix and the same resampler. Every size is bounded from the header
before decoding and again while decoding: a poison clip that claims a huge sample rate,
thousands of channels or hours of audio is refused with a reason instead of exhausting a
worker's memory (Ray would restart the worker and retry the same batch forever).
`decode_audio` raises only `AudioError`; the caller turns it into an error row.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch

from pipeline.formats import AUDIO_FORMATS, FFMPEG, LIBSNDFILE, decoders_for
from pipeline.storage import error_reason

if TYPE_CHECKING:
    import av
    import torchaudio

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
    """Decodes one clip's bytes (any format in `pipeline.formats`, or sniffed) to 16 kHz mono.

    `audio_format` (the file extension, any case; None when there is none) picks the decoders to
    try (`decoders_for`) and labels error messages. Both decoders enforce the same bounds: sample
    rate, channels and duration from the header before decoding, and duration again while
    decoding, so a header that under-reports cannot run away.
    """
    extension = audio_format.lower().lstrip(".") if audio_format else None
    what = f".{extension}" if extension else "audio"
    if not data:
        raise AudioError("empty file (0 bytes)")
    first_failure: _Unreadable | None = None
    for decoder in decoders_for(extension):
        try:
            mono, source_rate = _DECODERS[decoder](data, what, max_duration_s)
            break
        except _Unreadable as exc:
            first_failure = first_failure or exc
    else:
        if extension in AUDIO_FORMATS:  # the reason of the decoder the extension names first
            raise AudioError(str(first_failure)) from None
        raise AudioError(
            "not an audio file, or a format neither libsndfile nor FFmpeg decodes "
            f"({what if extension else 'no extension'})"
        ) from None

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


class _Unreadable(AudioError):
    """The decoder cannot open these bytes at all: the next decoder in line may."""


def _decode_with_libsndfile(
    data: bytes, what: str, max_duration_s: float
) -> tuple[np.ndarray, int]:
    """(frames,) float32 mono and the source rate. soundfile refuses a format argument for
    anything but RAW: libsndfile recognises the container from its header."""
    try:
        sound = sf.SoundFile(io.BytesIO(data))
    except Exception as exc:
        raise _Unreadable(f"cannot decode {what}: {_libsndfile_reason(exc)}") from None
    try:
        with sound:
            source_rate, channels, frames = sound.samplerate, sound.channels, sound.frames
            _check_header(source_rate, channels)
            if frames <= 0:
                raise AudioError("no audio frames")
            _check_duration(frames / source_rate, max_duration_s)
            mono = _read_mono(sound, max_frames=_max_frames(max_duration_s, source_rate))
    except AudioError:
        raise
    except Exception as exc:
        raise AudioError(f"cannot decode {what}: {_libsndfile_reason(exc)}") from None
    return mono, source_rate


def _libsndfile_reason(exc: Exception) -> str:
    if isinstance(exc, sf.LibsndfileError):
        # error_string drops soundfile's "Error opening <_io.BytesIO object at 0x...>" prefix.
        return exc.error_string
    return error_reason(exc)


def _check_header(sample_rate: int | None, channels: int | None) -> None:
    """Refuses an absurd rate or channel count; None: not known yet, checked on the frames."""
    if sample_rate is not None and not MIN_SOURCE_RATE <= sample_rate <= MAX_SOURCE_RATE:
        raise AudioError(
            f"unsupported sample rate {sample_rate} Hz "
            f"(accepted {MIN_SOURCE_RATE} to {MAX_SOURCE_RATE} Hz)"
        )
    if channels is not None and not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"unsupported channel count {channels} (accepted 1 to {MAX_CHANNELS})")


def _check_duration(duration_s: float, max_duration_s: float) -> None:
    if duration_s > max_duration_s:
        raise AudioError(f"too long: {duration_s:.1f} s, over the {max_duration_s:g} s limit")


def _max_frames(max_duration_s: float, sample_rate: int) -> int:
    return int(max_duration_s * sample_rate) + 1


def _too_long_while_decoding(max_frames: int, sample_rate: int) -> AudioError:
    return AudioError(f"too long: more than {max_frames / sample_rate:.1f} s of audio decoded")


def _read_mono(sound: sf.SoundFile, max_frames: int) -> np.ndarray:
    """(frames,) float32: the mean of the channels, decoded block by block."""
    blocks = []
    total = 0
    for block in sound.blocks(blocksize=_BLOCK_FRAMES, dtype="float32", always_2d=True):
        blocks.append(_mean_of_channels(block))  # block: (frames, channels) float32
        total += len(block)
        # MP3 frame counts are estimates: keep a header that under-reports from running away.
        if total > max_frames:
            raise _too_long_while_decoding(max_frames, sound.samplerate)
    if not blocks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(blocks)


def _decode_with_ffmpeg(data: bytes, what: str, max_duration_s: float) -> tuple[np.ndarray, int]:
    """(frames,) float32 mono and the source rate, from the first audio stream, via PyAV."""
    try:
        container = _pyav().open(
            io.BytesIO(data),
            metadata_errors="replace",  # a tag in a foreign encoding is no reason to fail
            container_options={"format_whitelist": _FFMPEG_DEMUXERS},
        )
    except Exception as exc:
        raise _Unreadable(f"cannot decode {what}: {_ffmpeg_reason(exc)}") from None
    with container:
        if not container.streams.audio:
            raise _Unreadable(f"cannot decode {what}: no audio stream")
        stream = container.streams.audio[0]
        try:
            return _decode_stream(container, stream, max_duration_s)
        except AudioError:
            raise
        except Exception as exc:
            raise AudioError(f"cannot decode {what}: {_ffmpeg_reason(exc)}") from None


def _decode_stream(
    container: av.container.InputContainer, stream: av.AudioStream, max_duration_s: float
) -> tuple[np.ndarray, int]:
    # 0 means the header does not say; every decoded frame is checked either way.
    _check_header(stream.codec_context.sample_rate or None, stream.codec_context.channels or None)
    declared_s = _declared_duration_s(container, stream)
    if declared_s is not None:
        _check_duration(declared_s, max_duration_s)
    # The pipeline runs one decoder per CPU; FFmpeg's default (0) is a thread per core.
    stream.codec_context.thread_count = 1

    downmix = _Downmix()
    total = 0
    source_rate = 0
    max_frames = 0
    for packet in container.demux(stream):  # other streams (video) are discarded unread
        for frame in packet.decode():
            _check_header(frame.sample_rate, frame.layout.nb_channels)
            if not source_rate:
                source_rate = frame.sample_rate
                max_frames = _max_frames(max_duration_s, source_rate)
            elif frame.sample_rate != source_rate:
                raise AudioError(
                    f"sample rate changes mid-stream ({source_rate} Hz to {frame.sample_rate} Hz)"
                )
            downmix.add(frame)
            total += frame.samples
            if total > max_frames:
                raise _too_long_while_decoding(max_frames, source_rate)
    mono = downmix.mono()
    if total == 0:
        raise AudioError("no audio frames")
    decoded_s = total / source_rate
    if (
        declared_s is not None
        and container.format.name.split(",")[0] in _EXACT_DURATION_DEMUXERS
        and decoded_s < declared_s - max(_TRUNCATION_TOLERANCE_S, 0.01 * declared_s)
    ):
        # Matroska and ASF demuxers stop quietly at the end of the data: a cut-off download
        # would otherwise be labeled as if it were the whole clip.
        raise AudioError(
            f"truncated: the header says {declared_s:.2f} s, only {decoded_s:.2f} s decoded"
        )
    return mono, source_rate


def _declared_duration_s(
    container: av.container.InputContainer, stream: av.AudioStream
) -> float | None:
    """The audio stream's duration from the header, or None when the header does not say."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    # Matroska keeps only the file's duration; with several streams (a video) it is not the
    # audio's own.
    if container.duration and len(container.streams) == 1:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _mean_of_channels(block: np.ndarray, sample_format: str = "flt") -> np.ndarray:
    """(frames, channels) samples -> (frames,) float32 in [-1, 1], the mean of the channels.

    sample_format: FFmpeg's name for the samples' type ("s16", "flt", ...; "flt" for float32).
    """
    dtype, full_scale, offset = _SAMPLE_FORMATS[sample_format]
    weights = np.full(block.shape[1], 1.0 / (block.shape[1] * full_scale), dtype=dtype)
    # A matrix-vector product: ~25x faster than block.mean(axis=1) over a short last axis.
    mono = block.astype(dtype, copy=False) @ weights
    if offset:
        mono -= offset / full_scale
    mono = mono.astype(np.float32, copy=False)
    if not np.isfinite(mono).all():
        # Not repaired: a file with NaN/Inf samples is broken, and its labels would be noise.
        raise AudioError("contains NaN/Inf samples")
    return mono


class _Downmix:
    """Decoded PyAV frames -> (samples,) float32 mono, converted a block at a time: numpy's
    per-call overhead on each 1024-sample frame would cost more than FFmpeg's decoding of it."""

    def __init__(self) -> None:
        self._blocks: list[np.ndarray] = []  # (samples,) float32
        self._pending: list[np.ndarray] = []  # (samples, channels), one sample format
        self._pending_samples = 0
        self._pending_kind: tuple[str, int] | None = None  # (sample format, channels)

    def add(self, frame: av.AudioFrame) -> None:
        channels = frame.layout.nb_channels
        samples = frame.to_ndarray()  # planar: (channels, samples); packed: (1, samples * ch)
        samples = samples.T if frame.format.is_planar else samples.reshape(-1, channels)
        kind = (frame.format.name.rstrip("p"), channels)
        if kind != self._pending_kind:
            self._flush()
            self._pending_kind = kind
        self._pending.append(samples)
        self._pending_samples += len(samples)
        if self._pending_samples >= _BLOCK_FRAMES:
            self._flush()

    def mono(self) -> np.ndarray:
        self._flush()
        return np.concatenate(self._blocks) if self._blocks else np.zeros(0, dtype=np.float32)

    def _flush(self) -> None:
        if self._pending:
            block = np.concatenate(self._pending)  # (samples, channels)
            self._blocks.append(_mean_of_channels(block, self._pending_kind[0]))
            self._pending, self._pending_samples = [], 0


def _ffmpeg_reason(exc: Exception) -> str:
    # FFmpegError's str() ends with the file name, which for in-memory input is "'<none>'".
    strerror = getattr(exc, "strerror", None)
    return f"FFmpeg: {strerror}" if strerror else error_reason(exc)


@functools.cache
def _pyav():
    """PyAV, imported on first use: FFmpeg's libraries load only in processes that need them."""
    import av
    import av.logging

    # None: FFmpeg's own log lines go nowhere (its default callback prints to the terminal).
    av.logging.set_level(None)
    return av


_DECODERS = {LIBSNDFILE: _decode_with_libsndfile, FFMPEG: _decode_with_ffmpeg}
# The demuxers FFmpeg may pick when it probes the bytes. Playlists and concat lists (hls,
# concat) would open other files or URLs named in the data; the rest are not audio.
_FFMPEG_DEMUXERS = "mov,matroska,ogg,mp3,aac,asf,flac,wav,w64,aiff,caf,au"
# Demuxers whose header states the duration exactly (not estimated from the bit rate).
_EXACT_DURATION_DEMUXERS = ("mov", "matroska", "asf")
_TRUNCATION_TOLERANCE_S = 0.2  # codecs' priming and padding are tens of ms
# FFmpeg sample format (planar or packed) -> (dtype to average in, full scale, zero offset)
_SAMPLE_FORMATS = {
    "u8": (np.float32, 128.0, 128.0),
    "s16": (np.float32, 2.0**15, 0.0),
    "s32": (np.float64, 2.0**31, 0.0),  # float32 would drop 24-bit FLAC's low bits
    "s64": (np.float64, 2.0**63, 0.0),
    "flt": (np.float32, 1.0, 0.0),
    "dbl": (np.float64, 1.0, 0.0),
}


def resample(waveform: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """(N,) float32 -> (ceil(N * new / orig),) float32 with torchaudio's sinc resampler."""
    if orig_rate == new_rate:
        return np.ascontiguousarray(waveform, dtype=np.float32)
    with torch.inference_mode():
        resampled = _resampler(orig_rate, new_rate)(torch.from_numpy(waveform))
    return resampled.numpy()


@functools.lru_cache(maxsize=16)
def _resampler(orig_rate: int, new_rate: int) -> torchaudio.transforms.Resample:
    # Imported here: a corpus already at 16 kHz never needs torchaudio (0.3 s per process).
    import torchaudio

    # The transform computes the sinc kernel once; torchaudio.functional.resample (same numbers,
    # same defaults) would rebuild it for every clip.
    return torchaudio.transforms.Resample(orig_rate, new_rate, dtype=torch.float32)


def cut_windows(
    waveform: np.ndarray,
    window_s: float,
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
