"""Reading a finished output: the one place that knows which of its unit files are committed.

The rule: a unit is committed when both its unit file (OUT/<unit>.parquet) and its commit marker
(OUT/.ast-label/commits/<unit>.json) are there. A unit file is written before its marker, so a
file without one (a run in progress, or killed between the two writes) is left out. An output
copied without its .ast-label folder (no markers and no hidden folder at all) is read whole.
Resume, inspect and every command that reads an output go through `committed_unit_files` or
`open_output`.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.defaults import META_DIR
from pipeline.errors import UserError
from pipeline.output.index import list_markers
from pipeline.output.layout import METADATA_KEY, OutputLocation, unit_id_of
from pipeline.storage import error_reason, list_folder, with_retries

T = TypeVar("T")

# The columns every reader of an output may rely on.
REQUIRED_COLUMNS = ("shard", "key", "start_s", "end_s", "duration_s", "error", "scores")


class UnreadableOutput(UserError):
    """There is no ast-label output at the location, or nothing of it is committed yet: the
    message says why and what to do."""


@dataclass(frozen=True)
class CommittedFiles:
    files: dict[str, str]  # unit id -> the unit file's path (in the output's filesystem)
    uncommitted: dict[str, str]  # the same of unit files without a commit marker (left out)
    exists: bool  # whether the location exists at all
    has_meta: bool  # whether the output has its .ast-label folder


def committed_unit_files(
    location: OutputLocation, markers: Collection[str] | None = None
) -> CommittedFiles:
    """The committed unit files of the output (see the module docstring for the rule). `markers`:
    the unit ids of the markers when the caller has listed them already. Raises StorageError when
    the store keeps failing."""
    fs, root = location.fs, location.root
    # A store that keeps failing is a StorageError (exit 3, run again), not "no output here".
    names = with_retries(lambda: list_folder(fs, root), f"cannot list {location.uri}")
    names = [name for name in names if name.rstrip("/") != root.rstrip("/")]
    exists = bool(names) or with_retries(lambda: _exists(fs, root), f"cannot list {location.uri}")
    unit_files = {
        unit_id_of(name): name
        for name in names
        if name.endswith(".parquet") and not posixpath.basename(name).startswith((".", "_"))
    }
    has_meta = any(posixpath.basename(name.rstrip("/")) == META_DIR for name in names)
    if markers is None:
        markers = list_markers(location) if has_meta else {}
    if markers or has_meta:
        committed = {unit: path for unit, path in unit_files.items() if unit in markers}
    else:  # copied without its .ast-label folder: every file at the top is a unit file
        committed = dict(unit_files)
    uncommitted = {unit: path for unit, path in unit_files.items() if unit not in committed}
    return CommittedFiles(committed, uncommitted, exists, has_meta)


def _exists(fs, path: str) -> bool:
    try:
        return bool(fs.exists(path))
    except FileNotFoundError:  # a missing bucket, for some stores
        return False


@dataclass(frozen=True)
class CommittedOutput:
    """An ast-label output, opened: its committed unit files and what their metadata says."""

    name: str  # the output as the user named it: how messages and reports show it
    location: OutputLocation
    files: tuple[str, ...]  # paths (in the output's filesystem) of the committed unit files
    metadata: dict[str, Any] = field(repr=False)  # the ast_label file metadata (model, labels...)
    uncommitted: int = 0  # unit files at the top without a commit marker (left out)
    # The first unit file's schema, read once: given to dataset(), which then opens no file.
    schema: pa.Schema | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return self.name

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.metadata.get("label_names", ()))

    @property
    def model(self) -> str:
        return str(self.metadata.get("model", "?"))

    def dataset(self) -> pads.Dataset:
        """The committed unit files as one pyarrow dataset (columns projected when scanned)."""
        return pads.dataset(
            list(self.files),
            schema=self.schema,
            format="parquet",
            filesystem=self.location.fs,
        )

    def read_unit_file(self, call: Callable[[], T], path: str) -> T:
        """call(), a read of one of its unit files. A file that is not Parquet is the output's
        problem: an UnreadableOutput at once. Any other failure is the store's: read again per
        storage.RetryPolicy, then a StorageError (exit 3: run again), never "fix it"."""
        what = f"cannot read {posixpath.basename(path)} in {self.uri}"
        try:
            return call()
        except pa.ArrowInvalid as error:  # retrying cannot help
            raise UnreadableOutput(f"{what}: {error_reason(error)}") from None
        except Exception:
            return with_retries(call, what)


def open_output(uri: str) -> CommittedOutput:
    """Lists the output's committed unit files and reads the label names from their metadata.
    Raises UnreadableOutput when there is no output there, it is not an ast-label output, or
    nothing of it is committed yet."""
    location = OutputLocation.of(uri)
    listing = committed_unit_files(location)
    if not listing.exists:
        raise UnreadableOutput(f"no output at {uri}: no such folder or prefix")
    if not listing.files:
        if listing.has_meta:
            raise UnreadableOutput(
                f"{uri} holds no committed results yet: a run is in progress, or none has "
                "committed a unit; run `ast-label run` again to finish it"
            )
        raise UnreadableOutput(f"{uri} is not an ast-label output: no *.parquet files at its top")
    files = tuple(sorted(listing.files.values()))
    left_out = len(listing.uncommitted)
    output = CommittedOutput(uri, location, files, {}, left_out)
    schema, metadata = _file_metadata(output, files[0])
    return CommittedOutput(uri, location, files, metadata, left_out, schema)


def unit_file_metadata(location: OutputLocation, path: str) -> dict[str, Any]:
    """The ast_label metadata of one unit file (what the run that wrote it recorded)."""
    output = CommittedOutput(location.uri, location, (path,), {})
    return _file_metadata(output, path)[1]


def _file_metadata(output: CommittedOutput, path: str) -> tuple[pa.Schema, dict[str, Any]]:
    """The unit file's schema and its ast_label metadata; UnreadableOutput unless ast-label's."""
    name = posixpath.basename(path)
    fs = output.location.fs
    schema = output.read_unit_file(lambda: pq.read_schema(path, filesystem=fs), path)
    text = (schema.metadata or {}).get(METADATA_KEY)
    missing = [column for column in REQUIRED_COLUMNS if column not in schema.names]
    if text is None or missing:
        raise UnreadableOutput(
            f"{output.uri} is not an ast-label output: {name} has no "
            + (f"{METADATA_KEY.decode()} metadata" if text is None else f"column {missing[0]}")
        )
    metadata = json.loads(text)
    scores_type = schema.field("scores").type
    names = metadata.get("label_names") or []
    if not pa.types.is_fixed_size_list(scores_type) or scores_type.list_size != len(names):
        raise UnreadableOutput(
            f"{output.uri}: {name} names {len(names)} labels but its scores column is "
            f"{scores_type}; it was not written by ast-label"
        )
    return schema, metadata


class NoEmbeddings(UserError):
    """The output has no usable embedding column."""


def embedding_size(output: CommittedOutput, purpose: str) -> int:
    """D, the embedding's size; NoEmbeddings (saying `purpose`, what is not possible without them)
    when the output does not hold them."""
    schema = output.schema
    if schema is None or "embedding" not in schema.names:
        raise NoEmbeddings(f"{output.uri} has no embedding column: {purpose}")
    kind = schema.field("embedding").type
    if not pa.types.is_fixed_size_list(kind) or not pa.types.is_floating(kind.value_type):
        raise NoEmbeddings(
            f"{output.uri}: its embedding column is {kind}, not fixed_size_list<float32>; "
            "it was not written by ast-label"
        )
    return int(kind.list_size)


def list_matrix(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A fixed_size_list<float>[W] column (embedding, scores, head_scores) -> (N, W) float32,
    read-only; null rows hold whatever their slots hold (the caller masks them)."""
    array = column
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return np.zeros((0, width), np.float32)
        # combine_chunks copies even a single chunk.
        array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    # .values ignores a slice's offset: the rows' values start at (offset * W) in the child.
    flat = array.values
    if flat.type == pa.float32():
        # A view of the values buffer: the child of a null row is null too, and to_numpy would
        # copy the whole matrix to put NaN there (a third of exact search's time).
        start = (flat.offset + array.offset * width) * 4
        values = np.frombuffer(flat.buffers()[1], np.float32, len(array) * width, start)
    else:
        values = flat.slice(array.offset * width, len(array) * width).to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(len(array), width)
