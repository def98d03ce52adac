"""Reading one work unit: its samples' bytes, streamed, never extracted to disk.

Reading never raises for bad data: every sample, file, unsafe member or unreadable shard becomes
exactly one `Member`, with `error` set when it cannot be used. A fault of the store is never the
data's: it raises StorageError, which ends the unit uncommitted (a rerun reads it again).
"""

from __future__ import annotations

import itertools
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

from pipeline.formats import AUDIO_EXTENSIONS, audio_format_of, extension_of
from pipeline.labeling.plan import WorkUnit
from pipeline.storage import (
    RetryingReader,
    StorageError,
    error_reason,
    filesystem_for,
    with_retries,
)

METADATA_EXTENSION = "json"
# The error row of a manifest entry that named no file when the run was planned.
MISSING = "not found: the manifest lists it, but there was no such file when the run started"
_AUDIO_SUFFIXES = " ".join(f".{extension}" for extension in AUDIO_EXTENSIONS)
_SPECIAL_MEMBER_KINDS = {
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "device",
    tarfile.BLKTYPE: "device",
    tarfile.FIFOTYPE: "fifo",
}
# Object-store reads of one tar shard go in blocks this big: bounded memory, few requests.
_STREAM_BLOCK_BYTES = 8 * 2**20
# tarfile's stream mode reads 10 KiB at a time by default: 30 calls through the retrying reader
# for one 300 KB clip. Reads of 256 KiB took a 300 KB member from 0.39 to 0.15 ms here (1 MiB:
# slower again, tarfile slices its buffer by copying).
_TAR_READ_BYTES = 256 * 2**10
# Plain files on object storage are small and latency-bound: fetch a few ahead, in order.
_FILE_PREFETCH = 8
# pax / GNU long-name headers are read into memory whole; real ones are a few hundred bytes.
_MAX_EXTENDED_HEADER_BYTES = 2**20
_EXTENDED_HEADER_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


@dataclass
class Member:
    """One sample of a unit: its audio bytes, or the reason it cannot be used."""

    key: str  # tar: WebDataset key (member path without extension); files: the file URI
    audio: bytes | None = None
    # Lower-case last extension ("wav", "m4a"; for a plain file any, "txt" too, so a decode
    # error can name it); None when there is none. decoders_for sniffs what it does not know.
    audio_format: str | None = None
    metadata: str | None = None  # text of the sample's .json member, when present
    error: str | None = None  # why the sample is unusable; None when `audio` is set


def read_unit_members(unit: WorkUnit, max_member_bytes: int) -> Iterator[Member]:
    """Streams a unit's samples: exactly one Member per sample, file, unsafe tar member or
    unreadable shard. Never raises for bad data; raises StorageError when the store fails after
    the retries. Tar shards are never extracted to disk nor read into memory whole."""
    missing = frozenset(unit.missing)
    if unit.kind == "tar":
        if missing:
            yield Member(key="", error=MISSING)
            return
        yield from _read_tar(unit.sources[0], max_member_bytes)
    elif unit.kind == "files":
        yield from _read_files(unit.sources, max_member_bytes, missing)
    else:
        raise ValueError(f"unknown work unit kind {unit.kind!r}")


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = folder + basename up to its first dot; extension = the rest.

    Leading dots belong to the basename (".hidden.wav" -> key ".hidden", extension "wav").
    """
    folder, _, base = name.rpartition("/")
    leading = len(base) - len(base.lstrip("."))
    dot = base.find(".", leading)
    stem, extension = (base, "") if dot < 0 else (base[:dot], base[dot + 1 :])
    return (f"{folder}/{stem}" if folder else stem), extension


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile, but a damaged or missing header is an error, and extended headers are capped.

    After the first member, tarfile ends the iteration silently on a header that is cut short,
    fails its checksum, or is missing because the stream simply stops: a truncated or corrupt
    shard would look complete. Every tar writer ends the archive with zero blocks instead.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            raise tarfile.ReadError(f"damaged tar header ({exc})") from None
        except tarfile.EmptyHeaderError:
            if tar.offset == 0:
                raise  # tarfile's own "empty file" error
            raise tarfile.ReadError("stream ends without the end-of-archive marker") from None

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        # tarfile reads pax and GNU long-name blocks into memory whole, before any member check.
        if self.type in _EXTENDED_HEADER_TYPES and self.size > _MAX_EXTENDED_HEADER_BYTES:
            raise tarfile.ReadError(f"extended tar header of {self.size} bytes")
        return super()._proc_member(tar)


@dataclass
class _Sample:
    """The contiguous tar members that share one WebDataset key."""

    key: str
    audio: bytes | None = None
    audio_format: str | None = None
    metadata: str | None = None
    audio_names: list[str] = field(default_factory=list)
    metadata_names: list[str] = field(default_factory=list)
    other_extensions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, tar: tarfile.TarFile, info: tarfile.TarInfo, extension: str, limit: int) -> None:
        """Takes one member; reads its data only when it is this sample's audio or metadata."""
        audio_format = audio_format_of(info.name)
        if audio_format is not None:
            self.audio_names.append(info.name)
            if len(self.audio_names) > 1:
                pass  # reported by finish(); which of two clips is "the" audio is not ours to pick
            elif info.size > limit:
                self.problems.append(_too_big(info.name, info.size, limit))
            else:
                self.audio = _read_member(tar, info)
                self.audio_format = audio_format
        elif extension.lower().rsplit(".", 1)[-1] == METADATA_EXTENSION:
            self.metadata_names.append(info.name)
            if len(self.metadata_names) > 1:
                pass  # reported by finish()
            elif info.size > limit:
                self.problems.append(_too_big(info.name, info.size, limit))
            else:
                self.metadata = _read_member(tar, info).decode("utf-8", errors="replace")
        else:
            # Other WebDataset fields (.txt, .cls, ...) are not ours; stream mode skips their data.
            self.other_extensions.append(f".{extension}" if extension else "(no extension)")

    def finish(self, seen_keys: set[str]) -> Member:
        if self.key in seen_keys:
            error = (
                "duplicate key: this sample's files are not contiguous in the shard "
                "(WebDataset keeps one sample's files together)"
            )
        elif len(self.audio_names) > 1:
            error = f"more than one audio member: {', '.join(self.audio_names)}"
        elif len(self.metadata_names) > 1:
            error = f"more than one .json member: {', '.join(self.metadata_names)}"
        elif self.problems:
            error = "; ".join(self.problems)
        elif self.audio is None:
            found = ", ".join(self.other_extensions + [".json"] * len(self.metadata_names))
            error = f"no audio member ({_AUDIO_SUFFIXES}); found {found}"
        else:
            error = None
        seen_keys.add(self.key)
        if error is not None:
            return Member(key=self.key, metadata=self.metadata, error=error)
        return Member(self.key, self.audio, self.audio_format, self.metadata, None)


def _read_tar(shard_uri: str, max_member_bytes: int) -> Iterator[Member]:
    """Raises StorageError when the store fails (the shard listed at planning time included):
    that is never the shard's fault, so it must not become an error row."""
    fs, path = filesystem_for(shard_uri)
    with RetryingReader(fs, path, _STREAM_BLOCK_BYTES) as stream:
        yield from _read_tar_stream(stream, max_member_bytes)


def _read_tar_stream(stream: IO[bytes], max_member_bytes: int) -> Iterator[Member]:
    try:
        # "r|*": a forward-only stream (no seeks, no index), gzip detected from the first bytes.
        # Closed by the `with tar` below; only opening is guarded here.
        tar = tarfile.open(  # noqa: SIM115
            fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo, bufsize=_TAR_READ_BYTES
        )
    except StorageError:
        raise
    except Exception as exc:
        yield Member(key="", error=f"shard unreadable: {error_reason(exc)}")
        return
    with tar:
        yield from _read_samples(tar, max_member_bytes)


def _read_samples(tar: tarfile.TarFile, max_member_bytes: int) -> Iterator[Member]:
    """Groups contiguous members by key; a sample is yielded when the next key starts."""
    yielded = 0
    seen_keys: set[str] = set()
    sample: _Sample | None = None
    failure: str | None = None
    entries = iter(tar)
    while True:
        try:
            info = next(entries, None)
        except StorageError:
            raise
        except Exception as exc:
            failure = error_reason(exc)
            break
        if info is None:
            break
        if info.isdir():
            continue  # `tar cf shard.tar folder/` writes folder entries; they hold no data
        unsafe = _unsafe_member(info)
        if unsafe is not None:
            yield Member(key=_printable(info.name), error=unsafe)
            yielded += 1
            continue
        key, extension = split_key(info.name)
        if sample is not None and key != sample.key:
            yield sample.finish(seen_keys)
            yielded += 1
            sample = None
        if sample is None:
            sample = _Sample(key)
        try:
            sample.add(tar, info, extension, max_member_bytes)
        except StorageError:
            raise
        except Exception as exc:  # the stream broke inside this member's data
            failure = error_reason(exc)
            sample.problems.append(f"member {_printable(info.name)} is cut short")
            break
    if sample is not None:
        yield sample.finish(seen_keys)
        yielded += 1
    if failure is not None:
        yield Member(key="", error=f"shard unreadable after {yielded} members: {failure}")
    elif yielded == 0:
        yield Member(key="", error="shard has no audio members")


def _unsafe_member(info: tarfile.TarInfo) -> str | None:
    """Why a member is refused, or None. Nothing is extracted, but these names would escape a
    folder in any tool that did, and a link's bytes are not the file it names."""
    name = info.name
    if name.startswith("/") or ".." in name.split("/") or "\x00" in name or "\\" in name:
        return "unsafe member name (absolute, '..', NUL or backslash)"
    if not info.isreg():
        kind = _SPECIAL_MEMBER_KINDS.get(info.type, "special member")
        return f"not a regular file ({kind})"
    return None


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    member = tar.extractfile(info)
    assert member is not None  # only called for regular files
    data = member.read()
    if len(data) != info.size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _read_files(
    uris: Sequence[str], max_member_bytes: int, missing: frozenset[str]
) -> Iterator[Member]:
    """One Member per file, in order, with a few reads in flight (object-store latency); the
    `missing` ones (listed in a manifest, not there at planning) are error rows without a read."""
    pending_uris = iter(uris)
    pool = ThreadPoolExecutor(max_workers=_FILE_PREFETCH)

    def fetch(uri: str) -> Future[Member]:
        if uri in missing:
            done: Future[Member] = Future()
            done.set_result(Member(key=uri, error=MISSING))
            return done
        return pool.submit(_read_file, uri, max_member_bytes)

    try:
        in_flight = deque(fetch(uri) for uri in itertools.islice(pending_uris, _FILE_PREFETCH))
        while in_flight:
            member = in_flight.popleft().result()
            following = next(pending_uris, None)
            if following is not None:
                in_flight.append(fetch(following))
            yield member
    finally:
        # A StorageError (or a consumer that stops) ends the unit: fetch no more, and do not wait
        # for the reads already running (each may retry for minutes in an outage); their
        # results are dropped when they end.
        pool.shutdown(wait=False, cancel_futures=True)


def _read_file(uri: str, max_member_bytes: int) -> Member:
    """Raises StorageError when the store fails, a missing file included (see _read_tar)."""
    fs, path = filesystem_for(uri)
    size = with_retries(lambda: fs.size(path), f"cannot read {uri}")
    if size is not None and size > max_member_bytes:
        return Member(key=uri, error=_too_big("file", size, max_member_bytes))
    # Ranged read: a file that grew since it was sized still cannot exceed the limit.
    data = with_retries(
        lambda: fs.cat_file(path, start=0, end=max_member_bytes + 1), f"cannot read {uri}"
    )
    if len(data) > max_member_bytes:
        return Member(key=uri, error=_too_big("file", len(data), max_member_bytes))
    return Member(key=uri, audio=data, audio_format=extension_of(uri))


def _too_big(what: str, size: int, limit: int) -> str:
    return f"{_printable(what)} is {size} bytes, over the limit of {limit} bytes (max_member_bytes)"


def _printable(name: str) -> str:
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in name)

