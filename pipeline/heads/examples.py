"""The examples a head learns from: which files (or spans of files) carry which of your labels.

Two ways to say it, both read into one `ExampleSpec` (nothing here decodes audio):

    a folder     EXAMPLES/<label>/...  one subfolder per label, any depth below it; every window
                 of a file is an example of its folder's label (a tar shard: of every member)
    a manifest   .csv or .parquet, one row per (file, label): `uri` (a file; a tar shard means
                 all its members) or `shard` + `key` (one member of a tar shard), `label`, and
                 optionally `start_s` + `end_s` (the label holds in that span only). Rows of one
                 file with different labels make it a multi-label example.

Files are named as `run` names them in an output: a plain file by its URI, a tar member by
(shard URI, WebDataset key). `check_audio` makes sure, before any audio is decoded, that every
file and key named exists, and lists the members of the tar shards that stand for all of them.
"""

from __future__ import annotations

import csv
import io
import math
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from pipeline.errors import UserError
from pipeline.labeling.inputs import InputError, expand_inputs, parent_uri, resolve_relative
from pipeline.labeling.members import split_key
from pipeline.labeling.plan import input_kind
from pipeline.storage import StorageError, error_reason, filesystem_for, uri_for, with_retries

MANIFEST_SUFFIXES = (".csv", ".parquet")
SPAN_COLUMNS = ("start_s", "end_s")


class ExamplesError(UserError):
    """The examples cannot train a head: the message names the file or label and what to do."""


@dataclass(frozen=True, order=True)
class FileRef:
    """One example file: a plain file (shard "", key = its URI) or a member of a tar shard
    (shard URI, key). Before `check_audio` or an output expands it, key None stands for every
    member of the shard."""

    shard: str
    key: str | None

    @property
    def name(self) -> str:
        """How messages and reports show the file."""
        if not self.shard:
            return str(self.key)
        return f"{self.shard} {self.key if self.key is not None else '(every member)'}"


@dataclass(frozen=True)
class Span:
    """A label on a whole file (no times) or on the span [start_s, end_s] of it."""

    label: str
    start_s: float | None = None
    end_s: float | None = None

    def selects(self, window_start_s: float, window_end_s: float) -> bool:
        """Whether a window is an example of this label. A timed span takes the windows that
        overlap it by at least half of the shorter of the two: an event shorter than a window
        belongs to the window that holds most of it, a long span to the windows mostly inside."""
        if self.start_s is None or self.end_s is None:
            return True
        overlap = min(window_end_s, self.end_s) - max(window_start_s, self.start_s)
        shorter = min(window_end_s - window_start_s, self.end_s - self.start_s)
        return overlap > 0 and overlap >= 0.5 * shorter - 1e-9


@dataclass(frozen=True)
class ExampleSpec:
    source: str  # "folder" or "manifest"
    location: str  # EXAMPLES as the user gave it
    label_names: tuple[str, ...]  # sorted: the head's label order
    spans: dict[FileRef, tuple[Span, ...]]  # every example file and its labeled spans
    notes: tuple[str, ...] = field(default=())  # what the examples left out, one line each

    def files_per_label(self) -> dict[str, int]:
        """Example files per label (a whole-shard entry counts once until expanded)."""
        counts = dict.fromkeys(self.label_names, 0)
        for spans in self.spans.values():
            for label in {span.label for span in spans}:
                counts[label] += 1
        return counts

    def input_uris(self) -> list[str]:
        """What `run` or `predict` must read: the plain files and the tar shards, sorted."""
        return sorted({ref.shard or str(ref.key) for ref in self.spans})

    def expanded(self, members: Mapping[str, Iterable[str]]) -> ExampleSpec:
        """Whole-shard entries replaced by one entry per member key (`members`: shard -> keys);
        a member named both ways keeps the spans of both."""
        spans: dict[FileRef, tuple[Span, ...]] = {}
        for ref, ref_spans in sorted(self.spans.items(), key=lambda item: _order(item[0])):
            keys = members[ref.shard] if ref.key is None else (ref.key,)
            for key in keys:
                member = FileRef(ref.shard, key)
                spans[member] = tuple(dict.fromkeys(spans.get(member, ()) + ref_spans))
        return replace(self, spans=spans)


def _order(ref: FileRef) -> tuple[str, str]:
    return ref.shard, ref.key or ""  # a whole-shard entry (key None) first


def read_examples(location: str, exclude: Iterable[str] = ()) -> ExampleSpec:
    """EXAMPLES as a folder of label folders or a .csv/.parquet manifest; `exclude` names
    folders that are never examples (the head's own). ExamplesError for a missing folder or
    manifest, one that cannot be read, or fewer than two labels."""
    if location.lower().endswith(MANIFEST_SUFFIXES):
        spec = _read_manifest(location)
    else:
        spec = _read_folder(location, tuple(exclude))
    if len(spec.label_names) < 2:
        found = ", ".join(repr(name) for name in spec.label_names) or "none"
        raise ExamplesError(
            f"examples {location} hold {len(spec.label_names)} label ({found}): a head needs at "
            "least two; add a folder (or manifest rows) for another label"
        )
    return spec


def check_enough_files(
    files_per_label: Mapping[str, int], total_files: int, folds: int, multi_label: bool
) -> None:
    """Raises ExamplesError naming the first label with fewer files than `folds` folds split by
    file need: each held-out fold must hold one (and, multi-label, one file without it)."""
    for label, count in files_per_label.items():
        if count < folds:
            raise ExamplesError(
                f"label {label!r} has {count} example file{'s' * (count != 1)}; {folds}-fold "
                f"cross-validation (split by file) needs at least {folds}: add files, or pass "
                f"--folds {max(2, count)}" + (" or fewer" if count >= 2 else "")
            )
        if multi_label and total_files - count < folds:
            raise ExamplesError(
                f"label {label!r} is missing from only {total_files - count} of {total_files} "
                f"files; a multi-label head's {folds} folds need at least {folds} files without "
                "each label: add such files, or lower --folds"
            )


def check_audio(spec: ExampleSpec) -> ExampleSpec:
    """Makes sure every file a manifest names exists and is a file, lists the member keys of
    the tar shards, and returns the spec with whole-shard entries expanded to members. Reads the
    shards' headers only. ExamplesError for a missing file or key."""
    if spec.source == "manifest":  # a folder's files come from its listing: they exist
        _check_files_exist(spec)
    shards = sorted({ref.shard for ref in spec.spans if ref.shard})
    members = {shard: shard_member_keys(shard) for shard in shards}
    for ref in spec.spans:
        if ref.key is not None and ref.shard and ref.key not in members[ref.shard]:
            raise ExamplesError(
                f"examples {spec.location} name key {ref.key!r}, which shard {ref.shard} does "
                "not hold: check the key (the member's path without its extensions)"
            )
    return spec.expanded(members)


def _check_files_exist(spec: ExampleSpec) -> None:
    uris = spec.input_uris()
    try:
        found = expand_inputs(uris).uris
    except InputError as error:
        raise ExamplesError(f"examples {spec.location}: {error}") from None
    folders = [uri for uri in uris if uri not in found]
    if folders:
        raise ExamplesError(
            f"examples {spec.location} name {folders[0]}, which is a folder: name files"
        )


def shard_member_keys(shard: str) -> list[str]:
    """The WebDataset keys of a tar shard's files, in shard order, read from its headers."""
    fs, path = filesystem_for(shard)

    def keys() -> list[str] | Exception:
        try:
            with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:*") as tar:
                names = [info.name for info in tar.getmembers() if info.isfile()]
        except (tarfile.TarError, EOFError) as error:
            return error  # the shard's own bytes: reading it again cannot help
        return list(dict.fromkeys(split_key(name)[0] for name in names))

    found = with_retries(keys, f"cannot read shard {shard}")
    if isinstance(found, Exception):
        raise ExamplesError(
            f"cannot list the members of shard {shard}: {error_reason(found)}; repair the "
            "shard or leave it out of the examples"
        )
    return found


def _read_folder(location: str, exclude: tuple[str, ...]) -> ExampleSpec:
    fs, root = filesystem_for(location)
    root_uri = uri_for(fs, root).rstrip("/")
    try:
        listing = expand_inputs([location], exclude=exclude)
    except InputError as error:
        raise ExamplesError(
            f"examples {location}: {error}; give a folder with one subfolder per label, or a "
            ".csv/.parquet manifest"
        ) from None
    if listing.uris == {root_uri}:
        raise ExamplesError(
            f"examples {location} is a file: give a folder with one subfolder per label, or a "
            ".csv/.parquet manifest"
        )
    entries = with_retries(lambda: fs.ls(root, detail=True), f"cannot list {location}")
    excluded = {filesystem_for(folder)[1].rstrip("/") for folder in exclude}
    # Every visible subfolder is a label, an empty one too: the fold check then names it.
    labels = sorted(
        entry["name"].rstrip("/").rsplit("/", 1)[-1]
        for entry in entries
        if entry.get("type") == "directory"
        and not entry["name"].rstrip("/").rsplit("/", 1)[-1].startswith(".")
        and entry["name"].rstrip("/") not in excluded
    )
    spans: dict[FileRef, tuple[Span, ...]] = {}
    outside = 0
    for uri in sorted(listing.uris):
        relative = uri[len(root_uri) :].strip("/")
        if "/" not in relative:
            outside += 1
            continue
        ref = FileRef(uri, None) if input_kind(uri) == "tar" else FileRef("", uri)
        spans[ref] = (Span(relative.split("/", 1)[0]),)
    notes = [f"left out: {n} {why}" for why, n in listing.skipped.items()]
    if outside:
        notes.insert(0, f"left out: {outside} files at the top of {location}, outside any label")
    return ExampleSpec("folder", location, tuple(labels), spans, tuple(notes))


def _read_manifest(location: str) -> ExampleSpec:
    fs, path = filesystem_for(location)
    try:
        data = with_retries(lambda: fs.cat_file(path), f"cannot read {location}")
    except StorageError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            raise ExamplesError(f"examples manifest {location} not found: check the path") from None
        if isinstance(error.__cause__, PermissionError):
            raise ExamplesError(f"{error}: check the credentials' read permission") from None
        raise
    try:
        rows = _manifest_rows(data, location)
    except ExamplesError:
        raise
    except Exception as error:  # csv, UTF-8 and Parquet readers raise assorted types
        raise ExamplesError(f"cannot read manifest {location}: {error_reason(error)}") from None
    base = parent_uri(location)
    spans: dict[FileRef, tuple[Span, ...]] = {}
    for number, row in rows:
        ref, span = _manifest_entry(row, base, f"manifest {location} row {number}")
        spans[ref] = tuple(dict.fromkeys(spans.get(ref, ()) + (span,)))
    if not spans:
        raise ExamplesError(f"manifest {location} has no rows: add one row per (file, label)")
    labels = sorted({span.label for ref_spans in spans.values() for span in ref_spans})
    return ExampleSpec("manifest", location, tuple(labels), spans)


def _manifest_rows(data: bytes, location: str) -> list[tuple[int, dict[str, object]]]:
    """(row number as a person counts it, {column: value}) with lower-case column names."""
    if location.lower().endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(pa.BufferReader(data))
        table = table.rename_columns([name.strip().lower() for name in table.column_names])
        columns, records = table.column_names, table.to_pylist()
        numbered = [(index + 1, record) for index, record in enumerate(records)]
    else:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        columns = [name.strip().lower() for name in reader.fieldnames or ()]
        reader.fieldnames = columns
        numbered = [(reader.line_num, row) for row in reader if any(v for v in row.values())]
    if "label" not in columns or not ({"uri", "shard"} & set(columns)):
        raise ExamplesError(
            f"manifest {location} has columns {', '.join(columns) or 'none'}: it needs 'label' "
            "and 'uri' (or 'shard' and 'key'), optionally 'start_s' and 'end_s'"
        )
    return numbered


def _manifest_entry(row: Mapping[str, object], base: str, where: str) -> tuple[FileRef, Span]:
    def text(name: str) -> str:
        value = row.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):  # pandas' empty
            return ""
        return str(value).strip()

    label = text("label")
    if not label:
        raise ExamplesError(f"{where}: the label is empty")
    uri, shard, key = text("uri"), text("shard"), text("key")
    if bool(uri) == bool(shard):
        raise ExamplesError(f"{where}: give either 'uri' or 'shard' (+ 'key'), not both or none")
    target = _canonical(resolve_relative(uri or shard, base))
    if shard and input_kind(target) != "tar":
        raise ExamplesError(f"{where}: shard {shard} is not a .tar shard")
    if uri:
        ref = FileRef(target, None) if input_kind(target) == "tar" else FileRef("", target)
    else:
        ref = FileRef(target, key or None)
    times = [text(name) for name in SPAN_COLUMNS]
    if not any(times):
        return ref, Span(label)
    try:
        start_s, end_s = (float(value) for value in times)
    except ValueError:
        raise ExamplesError(
            f"{where}: start_s and end_s must both be numbers (seconds), or both empty"
        ) from None
    if not 0 <= start_s < end_s:
        raise ExamplesError(f"{where}: the span {start_s:g}-{end_s:g} s is empty or negative")
    return ref, Span(label, start_s, end_s)


def _canonical(uri: str) -> str:
    """The URI as planning writes it into an output's rows (absolute local paths)."""
    return uri_for(*filesystem_for(uri))
