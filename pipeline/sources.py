"""Where the audio comes from: plan work units from the user's inputs, then stream each unit.

A work unit is what the pipeline commits as one output file: one WebDataset .tar shard, or a
group of other files, whatever their extension (one that is not audio becomes an error row).
Planning is deterministic (same inputs -> same unit ids and grouping) so a rerun recognises units
it already committed. Reading never raises for bad data: every sample, file, unsafe member or
unreadable shard becomes exactly one `Member`, with `error` set when it cannot be used.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import os
import posixpath
import re
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.defaults import FILES_PER_UNIT, META_DIR
from pipeline.errors import UserError
from pipeline.formats import AUDIO_EXTENSIONS, audio_format_of, extension_of
from pipeline.storage import (
    RetryingReader,
    StorageError,
    error_reason,
    filesystem_for,
    is_local,
    join_uri,
    storage_reason,
    uri_for,
    with_retries,
)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # tarfile's "r|*" reads gzip shards transparently
METADATA_EXTENSION = "json"
_AUDIO_SUFFIXES = " ".join(f".{extension}" for extension in AUDIO_EXTENSIONS)
_SPECIAL_MEMBER_KINDS = {
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "device",
    tarfile.BLKTYPE: "device",
    tarfile.FIFOTYPE: "fifo",
}

# A brace range this large is a typo, not a dataset; expanding it would exhaust memory.
MAX_BRACE_EXPANSION = 10_000_000
# When this many named inputs share an object-store folder, one LIST of the folder answers all
# their existence checks instead of one HEAD request each.
_LIST_PARENT_THRESHOLD = 64
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


T = TypeVar("T")


class InputError(UserError):
    """A user-caused input problem; the message is one line naming the input and what to do."""


@dataclass(frozen=True)
class WorkUnit:
    unit_id: str  # deterministic and filename-safe: names the unit's output file and commit marker
    kind: str  # "tar" | "files"
    sources: tuple[str, ...]  # the tar URI, or the plain file URIs (full URIs, sorted)

    def to_json(self) -> str:
        """The unit as one string: how it travels through a Ray dataset to the read tasks."""
        return json.dumps(
            {"unit_id": self.unit_id, "kind": self.kind, "sources": list(self.sources)}
        )

    @classmethod
    def from_json(cls, text: str) -> WorkUnit:
        fields = json.loads(text)
        return cls(unit_id=fields["unit_id"], kind=fields["kind"], sources=tuple(fields["sources"]))


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


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class Plan:
    units: list[WorkUnit]
    # Files that folders and globs listed but that are not inputs, by reason: hidden names, and
    # the files of ast-label outputs (this run's and earlier ones') lying inside an input folder.
    skipped: dict[str, int] = field(default_factory=dict)


def plan_work_units(
    inputs: Sequence[str],
    manifest: str | None = None,
    files_per_unit: int = FILES_PER_UNIT,
    exclude: Sequence[str] = (),
) -> Plan:
    """Expands inputs (paths, folders, globs, brace ranges, URLs, a manifest) into work units.

    Each .tar shard is one unit; every other file is sorted by URI and grouped `files_per_unit`
    at a time, whatever its extension: a file that is not audio becomes an error row saying so,
    never a silent gap. Tar units come first, in URI order. `exclude` names folders whose files
    are never inputs (the run's own output). Raises InputError for a missing input, a glob or
    folder with nothing in it, or an unreadable manifest.
    """
    if files_per_unit < 1:
        raise ValueError(f"files_per_unit must be >= 1, got {files_per_unit}")
    specs = [(spec, "") for spec in inputs]
    if manifest is not None:
        where = (
            f" (listed in manifest {manifest}; relative entries are resolved against the "
            "manifest's folder)"
        )
        specs += [(entry, where) for entry in read_manifest(manifest)]
    if not specs:
        raise InputError(
            "no inputs given: pass .tar shards, audio files, folders, globs or --manifest FILE"
        )

    skipped: Counter[str] = Counter()
    excluded = tuple(filesystem_for(folder)[1].rstrip("/") for folder in exclude)
    uris = _expand_specs(specs, _Listing(excluded, skipped))
    tars = sorted(uri for uri in uris if input_kind(uri) == "tar")
    files = sorted(uri for uri in uris if input_kind(uri) == "file")

    units = [WorkUnit(tar_unit_id(uri), "tar", (uri,)) for uri in tars]
    for index, start in enumerate(range(0, len(files), files_per_unit)):
        chunk = tuple(files[start : start + files_per_unit])
        units.append(WorkUnit(files_unit_id(index, chunk), "files", chunk))

    # Two units with one id would overwrite each other's output; 8 hex digits of the URI's hash
    # behind the same readable stem make that practically impossible, but never silently.
    ids = Counter(unit.unit_id for unit in units)
    clashes = [unit_id for unit_id, count in ids.items() if count > 1]
    if clashes:
        raise RuntimeError(f"work unit ids clash: {clashes[:3]}")
    return Plan(units, dict(skipped))


def input_kind(uri: str) -> str:
    """The input's kind: "tar" (a WebDataset shard) or "file" (one audio file, or a file that
    will be reported as not audio)."""
    return "tar" if uri.lower().endswith(TAR_SUFFIXES) else "file"


def tar_unit_id(uri: str) -> str:
    """A readable stem plus a short hash of the whole URI: equal basenames in different folders
    get different ids, and the same URI always gets the same id."""
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    for suffix in TAR_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    # Leading "_" / "." are stripped: output readers (Spark, Arrow datasets) skip such files.
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-")[:64] or "shard"
    return f"{stem}-{_sha1(uri)[:8]}"


def files_unit_id(index: int, uris: Sequence[str]) -> str:
    return f"files-{index:06d}-{_sha1(chr(10).join(uris))[:10]}"


def read_manifest(manifest: str) -> list[str]:
    """The input URIs listed by a manifest: text (one per line, blanks and # comments ignored),
    .csv or .parquet (column "uri", or the only column). Relative entries are resolved against
    the manifest's own folder."""
    lower = manifest.lower()
    fs, path = filesystem_for(manifest)
    data = _planning_call(
        lambda: fs.cat_file(path),
        manifest,
        not_found=f"manifest not found: {manifest}: check the --manifest path",
    )
    try:
        if lower.endswith(".parquet"):
            entries = _parquet_manifest_entries(data, manifest)
        else:
            text = data.decode("utf-8-sig")
            if lower.endswith(".csv"):
                entries = _csv_manifest_entries(text, manifest)
            else:
                entries = [line.strip() for line in text.splitlines()]
                entries = [line for line in entries if line and not line.startswith("#")]
    except InputError:
        raise
    except UnicodeDecodeError:
        raise InputError(
            f"manifest {manifest} is not UTF-8 text: give a text, .csv or .parquet manifest"
        ) from None
    except Exception as exc:
        raise InputError(f"cannot read manifest {manifest}: {error_reason(exc)}") from None
    if not entries:
        raise InputError(f"manifest {manifest} lists no URIs: add one input URI per line")
    base = _parent_uri(manifest)
    return [_resolve_relative(entry, base) for entry in entries]


def _planning_call(call: Callable[[], T], what: str, not_found: str) -> T:
    """A listing or read of planning, retried as every storage call is. What the user can fix
    (missing, forbidden) is an InputError; a store that keeps failing stays a StorageError: the
    run stops before any work, and the same command may simply be run again."""
    try:
        return with_retries(call, f"cannot read {what}")
    except StorageError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            raise InputError(not_found) from None
        if isinstance(error.__cause__, PermissionError):
            raise InputError(
                f"cannot read {what}: {storage_reason(error.__cause__)}: check the credentials' "
                "read permission"
            ) from None
        raise


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: "{000..099}" (zero padding kept), "{1..9..2}", "{a,b}".

    Groups that are neither a range nor a list ("{x}") stay literal, as in bash.
    """
    for match in re.finditer(r"\{([^{}]*)\}", pattern):
        alternatives = _brace_alternatives(match.group(1), pattern)
        if alternatives is None:
            continue
        head, tail = pattern[: match.start()], pattern[match.end() :]
        expanded: list[str] = []
        for alternative in alternatives:
            expanded.extend(expand_braces(head + alternative + tail))
            if len(expanded) > MAX_BRACE_EXPANSION:
                raise InputError(
                    f"brace pattern {pattern} names more than {MAX_BRACE_EXPANSION} inputs: "
                    "check the range, or use a manifest"
                )
        return list(dict.fromkeys(expanded))  # nested groups can repeat a name: keep the first
    return [pattern]


def _brace_alternatives(body: str, pattern: str) -> list[str] | None:
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?", body)
    if numeric:
        first_text, last_text, step_text = numeric.groups()
        first, last = int(first_text), int(last_text)
        step = abs(int(step_text)) if step_text else 1
        if step == 0:
            raise InputError(f"brace range step 0 in {pattern}: use a step of 1 or more")
        if abs(last - first) // step + 1 > MAX_BRACE_EXPANSION:
            raise InputError(
                f"brace pattern {pattern} names more than {MAX_BRACE_EXPANSION} inputs: "
                "check the range, or use a manifest"
            )
        # bash pads every term to the longer bound's width when either bound has a leading zero.
        padded = any(re.match(r"-?0\d", bound) for bound in (first_text, last_text))
        width = max(len(first_text), len(last_text)) if padded else 0
        direction = step if last >= first else -step
        stop = last + (1 if direction > 0 else -1)
        return [f"{n:0{width}d}" for n in range(first, stop, direction)]
    if "," in body:
        return body.split(",")
    return None


@dataclass(frozen=True)
class _Listing:
    """What folder and glob listings leave out, and the count of what they left out."""

    excluded: tuple[str, ...]  # folder paths (in their filesystem) whose files are not inputs
    skipped: Counter[str]

    def inputs(self, root: str, paths: Iterable[str]) -> list[str]:
        """The paths (files under `root`) that are inputs; the others are counted as skipped."""
        paths = list(paths)
        # Every ast-label output keeps a hidden .ast-label folder beside its Parquet files.
        outputs = {path.split(f"/{META_DIR}/", 1)[0] for path in paths if f"/{META_DIR}/" in path}
        outputs.update(self.excluded)
        found = []
        for path in paths:
            if any(path == out or path.startswith(f"{out}/") for out in outputs):
                self.skipped["files of ast-label outputs"] += 1
            elif _is_hidden_below(root, path):
                self.skipped["hidden files and folders"] += 1
            else:
                found.append(path)
        return found


def _expand_specs(specs: Sequence[tuple[str, str]], listing: _Listing) -> set[str]:
    """All input file URIs named by the specs (each with a note on where it came from)."""
    uris: set[str] = set()
    named: list[tuple[fsspec.AbstractFileSystem, str, str, str]] = []
    for spec, where in specs:
        spec = spec.strip()
        if not spec:
            continue
        for pattern in expand_braces(spec):
            fs, path = filesystem_for(pattern)
            if _is_glob(pattern):
                uris.update(_expand_glob(fs, path, pattern, where, listing))
            else:
                named.append((fs, path, pattern, where))
    listings = _shared_folder_listings([(fs, path) for fs, path, _, _ in named])
    for fs, path, pattern, where in named:
        info = listings.get((fs, posixpath.dirname(path)), {}).get(path)
        uris.update(_expand_named(fs, path, pattern, where, listing, info))
    return uris


def _is_glob(pattern: str) -> bool:
    # "[" is left out on purpose: it is far more often part of a real file name than a glob class.
    return "*" in pattern or "?" in pattern


def _shared_folder_listings(
    paths: Iterable[tuple[fsspec.AbstractFileSystem, str]],
) -> dict[tuple[fsspec.AbstractFileSystem, str], dict[str, dict]]:
    """{(fs, folder): {path: info}} for object-store folders that many named inputs share."""
    per_folder = Counter((fs, posixpath.dirname(path)) for fs, path in paths)
    listings = {}
    for (fs, folder), count in per_folder.items():
        if count >= _LIST_PARENT_THRESHOLD and not isinstance(fs, LocalFileSystem):
            # Failures are fine here: the per-path checks that follow report what is missing.
            with contextlib.suppress(Exception):
                listings[fs, folder] = {info["name"]: info for info in fs.ls(folder, detail=True)}
    return listings


def _expand_named(
    fs: fsspec.AbstractFileSystem,
    path: str,
    pattern: str,
    where: str,
    listing: _Listing,
    info: dict | None = None,
) -> list[str]:
    info = info or _planning_call(
        lambda: fs.info(path),
        f"input {pattern}{where}",
        not_found=f"input not found: {pattern}{where}: check the path, bucket and key",
    )
    if info.get("type") == "directory":
        found = _list_folder(fs, path, listing)
        if not found:
            raise InputError(f"no files to label under {pattern}{where}{_skip_note(listing)}")
        return found
    return [uri_for(fs, path)]  # named explicitly: an input whatever its name


def _expand_glob(
    fs: fsspec.AbstractFileSystem, path: str, pattern: str, where: str, listing: _Listing
) -> list[str]:

    def glob() -> dict | ValueError:
        try:
            return fs.glob(path, detail=True)
        except ValueError as exc:  # e.g. "**" not a whole path component: not worth a retry
            return exc

    matches = _planning_call(
        glob,
        f"the files of {pattern}{where}",
        not_found=f"no files to label match {pattern}{where}: check the pattern",
    )
    if isinstance(matches, ValueError):
        raise InputError(f"invalid glob {pattern}{where}: {matches}")
    # Hidden names are skipped below the pattern's literal folder, as in a folder listing.
    literal_root = posixpath.dirname(re.split(r"[*?]", path, maxsplit=1)[0])
    files: list[str] = []
    found: list[str] = []
    for match, info in sorted(matches.items()):
        if info.get("type") != "directory":
            files.append(match)
        elif "**" not in path and not _is_hidden_below(literal_root, match):
            # "data/*" matching sub-folders means their contents; "**" has already listed them.
            found += _list_folder(fs, match, listing)
    found += [uri_for(fs, match) for match in listing.inputs(literal_root, files)]
    if not found:
        raise InputError(
            f"no files to label match {pattern}{where}{_skip_note(listing)}: check the pattern"
        )
    return found


def _list_folder(fs: fsspec.AbstractFileSystem, folder: str, listing: _Listing) -> list[str]:
    """Input files anywhere under a folder: all but hidden ones (".x") and ast-label outputs."""
    found = _planning_call(
        lambda: fs.find(folder, detail=True),
        f"the folder {folder}",
        not_found=f"input not found: {folder}: check the path, bucket and key",
    )
    files = [path for path, info in sorted(found.items()) if info.get("type") == "file"]
    return [uri_for(fs, path) for path in listing.inputs(folder, files)]


def _skip_note(listing: _Listing) -> str:
    if not listing.skipped:
        return ""
    return " (skipped: " + ", ".join(f"{n} {why}" for why, n in listing.skipped.items()) + ")"


def _is_hidden_below(folder: str, path: str) -> bool:
    """Whether a file or folder between `folder` and `path` is hidden (".cache", "._x.wav")."""
    relative = path[len(folder) :].strip("/")
    return any(part.startswith(".") for part in relative.split("/"))


def _csv_manifest_entries(text: str, manifest: str) -> list[str]:
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    if "uri" in header:
        column = header.index("uri")
        body = rows[1:]
    elif len(header) == 1:
        # A single column may come without a header: keep the first row when it names an input.
        first = rows[0][0].strip()
        body = rows if ("/" in first or "." in first.rsplit("/", 1)[-1]) else rows[1:]
        column = 0
    else:
        raise InputError(
            f"manifest {manifest} has columns {', '.join(rows[0])}: "
            "name the column of input URIs 'uri'"
        )
    return [row[column].strip() for row in body if len(row) > column and row[column].strip()]


def _parquet_manifest_entries(data: bytes, manifest: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(data))
    names = table.column_names
    if "uri" in names:
        column = table.column("uri")
    elif len(names) == 1:
        column = table.column(0)
    else:
        raise InputError(
            f"manifest {manifest} has columns {', '.join(names)}: "
            "name the column of input URIs 'uri'"
        )
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise InputError(f"manifest {manifest}: the URI column is {column.type}, not strings")
    return [value.strip() for value in column.to_pylist() if value and value.strip()]


def _parent_uri(uri: str) -> str:
    if is_local(uri):
        _, path = filesystem_for(uri)
        return os.path.dirname(path)
    return uri.rstrip("/").rsplit("/", 1)[0]


def _resolve_relative(entry: str, base: str) -> str:
    if "://" in entry or os.path.isabs(entry) or entry.startswith("~"):
        return entry
    if is_local(base):
        return os.path.normpath(os.path.join(base, entry))
    # Object stores have no "..": resolve it here, as a local path would be.
    scheme, _, rest = join_uri(base, entry).partition("://")
    return f"{scheme}://{posixpath.normpath(rest)}"


# ---------------------------------------------------------------------------------------------
# Reading


def read_unit_members(unit: WorkUnit, max_member_bytes: int) -> Iterator[Member]:
    """Streams a unit's samples: exactly one Member per sample, file, unsafe tar member or
    unreadable shard. Never raises for bad data; raises StorageError when the store fails after
    the retries. Tar shards are never extracted to disk nor read into memory whole."""
    if unit.kind == "tar":
        yield from _read_tar(unit.sources[0], max_member_bytes)
    elif unit.kind == "files":
        yield from _read_files(unit.sources, max_member_bytes)
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


def _read_files(uris: Sequence[str], max_member_bytes: int) -> Iterator[Member]:
    """One Member per file, in order, with a few reads in flight (object-store latency)."""
    pending_uris = iter(uris)
    pool = ThreadPoolExecutor(max_workers=_FILE_PREFETCH)
    try:
        in_flight = deque(
            pool.submit(_read_file, uri, max_member_bytes)
            for uri in itertools.islice(pending_uris, _FILE_PREFETCH)
        )
        while in_flight:
            member = in_flight.popleft().result()
            following = next(pending_uris, None)
            if following is not None:
                in_flight.append(pool.submit(_read_file, following, max_member_bytes))
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


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()
