"""The user's inputs -> the file URIs they name: paths, folders (recursive), globs (`*`, `**`),
brace ranges (`{000000..000999}`, `{a,b}`), any fsspec URL, and manifests (text, CSV, Parquet).

Hidden files and folders, and the files of ast-label outputs lying inside an input folder, are
not inputs: they are counted by reason instead. Everything a user can get wrong here (a missing
input, an empty glob or folder, an unreadable manifest) is an InputError of one line.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.defaults import META_DIR
from pipeline.errors import UserError
from pipeline.storage import (
    StorageError,
    error_reason,
    filesystem_for,
    is_local,
    join_uri,
    storage_reason,
    uri_for,
    with_retries,
)

# A brace range this large is a typo, not a dataset; expanding it would exhaust memory.
MAX_BRACE_EXPANSION = 10_000_000
# When this many named inputs share an object-store folder, one LIST of the folder answers all
# their existence checks instead of one HEAD request each.
_LIST_PARENT_THRESHOLD = 64

T = TypeVar("T")


class InputError(UserError):
    """A user-caused input problem; the message is one line naming the input and what to do."""


class InputNotFound(InputError):
    """A named input that does not exist."""


@dataclass(frozen=True)
class InputFiles:
    uris: set[str]  # every input file URI the inputs name, the missing ones included
    # Files that folders and globs listed but that are not inputs, by reason: hidden names, and
    # the files of ast-label outputs (this run's and earlier ones') lying inside an input folder.
    skipped: dict[str, int] = field(default_factory=dict)
    # Manifest entries that name no file: still inputs (each becomes an error row saying so), as
    # a manifest is a list of what should be there; a missing input on the command line is a typo.
    missing: frozenset[str] = frozenset()
    sizes: dict[str, int] = field(default_factory=dict)  # URI -> bytes, where listings said


def expand_inputs(
    inputs: Sequence[str], manifest: str | None = None, exclude: Sequence[str] = ()
) -> InputFiles:
    """Every input file URI that the inputs and the manifest name. `exclude` names folders whose
    files are never inputs (the run's own output). A manifest's entries that do not exist are
    returned in `missing` (they become error rows); raises InputError for a missing input on the
    command line, a glob or folder with nothing in it, an unreadable manifest, or no inputs."""
    specs = [_Spec(spec) for spec in inputs]
    if manifest is not None:
        where = (
            f" (listed in manifest {manifest}; relative entries are resolved against the "
            "manifest's folder)"
        )
        specs += [_Spec(entry, where, listed=True) for entry in read_manifest(manifest)]
    if not specs:
        raise InputError(
            "no inputs given: pass .tar shards, audio files, folders, globs or --manifest FILE"
        )
    skipped: Counter[str] = Counter()
    excluded = tuple(filesystem_for(folder)[1].rstrip("/") for folder in exclude)
    missing: set[str] = set()
    listing = _Listing(excluded, skipped)
    uris = _expand_specs(specs, listing, missing)
    return InputFiles(uris | missing, dict(skipped), frozenset(missing), listing.sizes)


@dataclass(frozen=True)
class _Spec:
    text: str  # a path, URI, glob or brace pattern
    where: str = ""  # where it came from, for messages: "" (the command line) or the manifest
    listed: bool = False  # listed in a manifest: a missing file is an input (an error row)


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
    base = parent_uri(manifest)
    return [resolve_relative(entry, base) for entry in entries]


def _planning_call(call: Callable[[], T], what: str, not_found: str) -> T:
    """A listing or read of planning, retried as every storage call is. What the user can fix
    (missing, forbidden) is an InputError; a store that keeps failing stays a StorageError: the
    run stops before any work, and the same command may simply be run again."""
    try:
        return with_retries(call, f"cannot read {what}")
    except StorageError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            raise InputNotFound(not_found) from None
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
    sizes: dict[str, int] = field(default_factory=dict)  # URI -> bytes, as listed

    def sized(self, fs: fsspec.AbstractFileSystem, path: str, info: dict) -> str:
        """The file's URI, its size (from its listing entry) noted."""
        uri = uri_for(fs, path)
        self.sizes[uri] = int(info.get("size") or 0)
        return uri

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


def _expand_specs(specs: Sequence[_Spec], listing: _Listing, missing: set[str]) -> set[str]:
    """All input file URIs named by the specs; manifest entries that name no file go to
    `missing`."""
    uris: set[str] = set()
    named: list[tuple[fsspec.AbstractFileSystem, str, str, _Spec]] = []
    for spec in specs:
        text = spec.text.strip()
        if not text:
            continue
        for pattern in expand_braces(text):
            fs, path = filesystem_for(pattern)
            if _is_glob(pattern):
                uris.update(_expand_glob(fs, path, pattern, spec.where, listing))
            else:
                named.append((fs, path, pattern, spec))
    listings = _shared_folder_listings([(fs, path) for fs, path, _, _ in named])
    for fs, path, pattern, spec in named:
        info = listings.get((fs, posixpath.dirname(path)), {}).get(path)
        try:
            uris.update(_expand_named(fs, path, pattern, spec.where, listing, info))
        except InputNotFound:
            if not spec.listed:
                raise
            missing.add(uri_for(fs, path))
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
    return [listing.sized(fs, path, info)]  # named explicitly: an input whatever its name


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
    files: dict[str, dict] = {}
    found: list[str] = []
    for match, info in sorted(matches.items()):
        if info.get("type") != "directory":
            files[match] = info
        elif "**" not in path and not _is_hidden_below(literal_root, match):
            # "data/*" matching sub-folders means their contents; "**" has already listed them.
            found += _list_folder(fs, match, listing)
    found += [
        listing.sized(fs, match, files[match]) for match in listing.inputs(literal_root, files)
    ]
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
    files = {path: info for path, info in sorted(found.items()) if info.get("type") == "file"}
    return [listing.sized(fs, path, files[path]) for path in listing.inputs(folder, files)]


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


def parent_uri(uri: str) -> str:
    if is_local(uri):
        _, path = filesystem_for(uri)
        return os.path.dirname(path)
    return uri.rstrip("/").rsplit("/", 1)[0]


def resolve_relative(entry: str, base: str) -> str:
    if "://" in entry or os.path.isabs(entry) or entry.startswith("~"):
        return entry
    if is_local(base):
        return os.path.normpath(os.path.join(base, entry))
    # Object stores have no "..": resolve it here, as a local path would be.
    scheme, _, rest = join_uri(base, entry).partition("://")
    return f"{scheme}://{posixpath.normpath(rest)}"
