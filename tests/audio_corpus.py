"""Real audio files and WebDataset shards, generated for tests (no fixtures checked in).

    from audio_corpus import sine, encode, write_tar_shard, bad_members  # tests/ is on sys.path

    wav = encode(sine(1.0, sr=44_100, channels=2), 44_100, "wav", "PCM_16")
    write_tar_shard(tmp_path / "shard-000000.tar", [("clip-0.wav", wav), ("clip-0.json", b"{}")])

`bad_members()` is the bad-input corpus: each entry is one tar member that must come out of the
pipeline as exactly one error row whose reason contains `expected_error`, when read with
`max_member_bytes=BAD_CORPUS_MAX_MEMBER_BYTES` and decoded with
`max_duration_s=BAD_CORPUS_MAX_DURATION_S`. `bad_shard_entries()` adds the cases that need tar
structure (links, folders, a duplicate key, two audio files in one sample).
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import soundfile as sf

BAD_CORPUS_MAX_DURATION_S = 30.0
BAD_CORPUS_MAX_MEMBER_BYTES = 1 << 20

# A tar entry: (member name, bytes) for a regular file, or a TarInfo for anything else
# (see `symlink`, `folder`); a TarInfo with a size needs bytes: (TarInfo, bytes).
TarEntry = tuple[str, bytes] | tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]

_SUBTYPES = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS", "mp3": "MPEG_LAYER_III"}


def sine(
    duration_s: float,
    sr: int = 16_000,
    channels: int = 1,
    freq: float = 440.0,
    amplitude: float = 0.5,
) -> np.ndarray:
    """float32 sine: (frames,) when mono, (frames, channels) otherwise (same tone on each)."""
    t = np.arange(round(duration_s * sr)) / sr
    tone = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return tone if channels == 1 else np.repeat(tone[:, None], channels, axis=1)


def encode(waveform: np.ndarray, sr: int, fmt: str = "wav", subtype: str | None = None) -> bytes:
    """Encodes (frames,) or (frames, channels) samples with libsndfile: wav/flac/ogg/mp3.

    subtype: e.g. "PCM_U8", "PCM_16", "PCM_24", "FLOAT" for WAV; a per-format default otherwise.
    """
    buffer = io.BytesIO()
    sf.write(buffer, waveform, sr, format=fmt.upper(), subtype=subtype or _SUBTYPES[fmt.lower()])
    return buffer.getvalue()


def wav_bytes(
    sample_rate: int,
    channels: int,
    pcm: bytes,
    bits: int = 16,
    format_tag: int = 1,
    claimed_data_bytes: int | None = None,
) -> bytes:
    """A WAV file built byte by byte, so its header can say anything (absurd rates, 0 frames)."""
    block_align = channels * bits // 8
    byte_rate = (sample_rate * block_align) & 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", format_tag, channels, sample_rate, byte_rate, block_align, bits)
    data_len = len(pcm) if claimed_data_bytes is None else claimed_data_bytes
    body = (
        b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", data_len)
        + pcm
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def folder(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def write_tar_shard(path_or_fileobj: str | os.PathLike | BinaryIO, members: list[TarEntry]) -> None:
    """Writes a tar (PAX format, so any name survives) with the members in the given order."""
    if isinstance(path_or_fileobj, (str, os.PathLike)):
        Path(path_or_fileobj).parent.mkdir(parents=True, exist_ok=True)
        with open(path_or_fileobj, "wb") as f:
            _write_tar(f, members)
    else:
        _write_tar(path_or_fileobj, members)


def tar_bytes(members: list[TarEntry]) -> bytes:
    buffer = io.BytesIO()
    _write_tar(buffer, members)
    return buffer.getvalue()


def _write_tar(fileobj: BinaryIO, members: list[TarEntry]) -> None:
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in members:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
                continue
            head, data = entry
            if isinstance(head, tarfile.TarInfo):
                info = head
            else:
                info = tarfile.TarInfo(head)
                if "\x00" in head:  # only a pax "path" record can carry a NUL byte
                    info.name = head.replace("\x00", "_")
                    info.pax_headers = {"path": head}
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))


class BadMember(NamedTuple):
    name: str  # tar member name
    data: bytes
    expected_error: str  # a substring of the error row's reason

    @property
    def key(self) -> str:
        """The key its error row carries: the whole (unsafe) name, or the WebDataset key."""
        name = self.name
        if name.startswith("/") or ".." in name.split("/") or "\\" in name or "\x00" in name:
            return name.replace("\x00", "\\x00")
        return name.split(".", 1)[0]


def bad_members() -> list[BadMember]:
    """One regular tar member per kind of bad input; each name has its own key."""
    clip = sine(0.5, sr=16_000)
    nan = clip.copy()
    nan[100] = np.nan
    inf = clip.copy()
    inf[200] = np.inf
    flac = encode(clip, 16_000, "flac")
    long_s = BAD_CORPUS_MAX_DURATION_S + 5
    return [
        BadMember("empty.wav", b"", "empty file"),
        BadMember("text-renamed.wav", b"this is a text file, not audio\n" * 20, "cannot decode"),
        BadMember("corrupt.wav", b"RIFF" + np.random.default_rng(0).bytes(2000), "cannot decode"),
        BadMember("corrupt-stream.flac", b"fLaC" + bytes(range(256)) * 8, "cannot decode"),
        BadMember("truncated.flac", flac[: len(flac) // 2], "cannot decode"),
        BadMember("nan.wav", encode(nan, 16_000, "wav", "FLOAT"), "NaN/Inf"),
        BadMember("inf.wav", encode(inf, 16_000, "wav", "FLOAT"), "NaN/Inf"),
        BadMember("huge-rate.wav", wav_bytes(2_000_000_000, 1, bytes(3200)), "sample rate"),
        BadMember("tiny-rate.wav", wav_bytes(200, 1, bytes(3200)), "sample rate"),
        BadMember("many-channels.wav", wav_bytes(16_000, 100, bytes(100 * 2 * 50)), "channel"),
        BadMember("no-frames.wav", wav_bytes(16_000, 1, b""), "no audio frames"),
        # 8-bit at 4 kHz keeps a too-long file small: 35 s is 140 kB.
        BadMember("too-long.wav", encode(sine(long_s, 4_000), 4_000, "wav", "PCM_U8"), "too long"),
        BadMember("too-short.wav", encode(sine(0.01, sr=16_000), 16_000, "wav"), "too short"),
        BadMember("oversized.wav", bytes(BAD_CORPUS_MAX_MEMBER_BYTES + 1), "over the limit"),
        BadMember("metadata-only.json", b'{"label": "none"}', "no audio member"),
        BadMember("notes.txt", b"not part of any sample", "no audio member"),
        BadMember("../escape.wav", encode(clip, 16_000), "unsafe member name"),
        BadMember("/abs/path.wav", encode(clip, 16_000), "unsafe member name"),
        BadMember("back\\slash.wav", encode(clip, 16_000), "unsafe member name"),
        BadMember("nul\x00byte.wav", encode(clip, 16_000), "unsafe member name"),
    ]


def bad_shard_entries() -> tuple[list[TarEntry], dict[str, str]]:
    """Tar entries for the structural cases, and the expected error substring by key.

    The folder entry yields nothing (folders carry no data); everything else yields one Member.
    """
    clip = encode(sine(0.5), 16_000)
    entries: list[TarEntry] = [
        folder("clips"),
        ("clips/good-a.wav", clip),
        ("clips/two-audio.wav", clip),
        ("clips/two-audio.flac", encode(sine(0.5), 16_000, "flac")),
        ("clips/split.wav", clip),
        ("clips/good-b.wav", clip),
        ("clips/split.json", b'{"late": true}'),  # same key again, after another sample
        symlink("clips/link.wav", "good-a.wav"),
    ]
    expected = {
        "clips/two-audio": "more than one audio member",
        "clips/split": "duplicate key",
        "clips/link.wav": "not a regular file (symlink)",
    }
    return entries, expected


def write_audio_files(folder_path: Path, names: list[str], duration_s: float = 0.5) -> list[Path]:
    """Writes one short sine clip per name, in the format its extension names."""
    paths = []
    for index, name in enumerate(names):
        path = folder_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = name.rsplit(".", 1)[1].lower()
        path.write_bytes(encode(sine(duration_s, freq=220.0 * (index + 1)), 16_000, fmt))
        paths.append(path)
    return paths


def encode_with_pyav(
    waveform: np.ndarray,
    sr: int,
    container: str = "mp4",
    codec: str = "aac",
    container_options: dict[str, str] | None = None,
) -> bytes:
    """Encodes (frames,) or (frames, channels) float samples with FFmpeg, through PyAV.

    container: an FFmpeg muxer ("mp4" or "ipod" for M4A, "webm", "matroska", "ogg", "adts",
    "asf"); codec: an FFmpeg encoder ("aac", "libopus" (48 kHz), "wmav2", "flac", ...).
    container_options: e.g. {"movflags": "frag_keyframe+empty_moov"} for a fragmented MP4.
    """
    import av

    planar = np.ascontiguousarray(np.atleast_2d(waveform.T), dtype=np.float32)  # (C, frames)
    layout = "mono" if planar.shape[0] == 1 else "stereo"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container, container_options=container_options) as out:
        stream = out.add_stream(codec, rate=sr, layout=layout)
        if codec == "wmav2":
            stream.bit_rate = 128_000  # the WMA encoder refuses the default
        for start in range(0, planar.shape[1], 4096):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(planar[:, start : start + 4096]), format="fltp", layout=layout
            )
            frame.sample_rate = sr
            frame.pts = start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def remux(data: bytes, container: str) -> bytes:
    """The first audio stream of `data`, its packets copied unchanged into another container
    (e.g. libsndfile's Ogg/Vorbis into WebM, FLAC into Matroska)."""
    import av

    buffer = io.BytesIO()
    with av.open(io.BytesIO(data)) as source, av.open(buffer, "w", format=container) as out:
        audio = source.streams.audio[0]
        copied = out.add_stream_from_template(audio)
        for packet in source.demux(audio):
            if packet.dts is None:  # the flush packet at the end carries no data
                continue
            packet.stream = copied
            out.mux(packet)
    return buffer.getvalue()


def video_with_audio(
    audio_tracks: list[np.ndarray], sr: int, duration_s: float, container: str = "mp4"
) -> bytes:
    """A small video (MPEG-4 Part 2, 64x48, 10 fps; the first stream) followed by one mono AAC
    stream per entry of `audio_tracks`: a video without sound when the list is empty."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = [out.add_stream("aac", rate=sr, layout="mono") for _ in audio_tracks]
        for index in range(round(duration_s * 10)):
            image = np.full((48, 64, 3), index * 20 % 256, dtype=np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(video.encode(None))
        for stream, track in zip(audio, audio_tracks, strict=True):
            for start in range(0, len(track), 4096):
                chunk = np.ascontiguousarray(track[None, start : start + 4096], dtype=np.float32)
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate = sr
                frame.pts = start
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    return buffer.getvalue()
