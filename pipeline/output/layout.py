"""Where everything of an output lives, and the small files that describe it.

Under the output URI OUT:

    OUT/<unit_id>.parquet                     a committed unit's rows, sorted by key, window
    OUT/.ast-label/commits/<unit_id>.json     its commit marker: the unit is done
    OUT/.ast-label/staging/<unit_id>/<run>-<uuid>.parquet   parts the classifier actors staged
    OUT/.ast-label/index.jsonl.gz             every marker of the output, in one file (a cache)
    OUT/.ast-label/labels.csv                 index,name of every label: for SQL queries
    OUT/.ast-label/head-labels.csv            with a head: index,name,threshold of its labels
    OUT/.ast-label/summary.json               the last run's summary
    OUT/.ast-label/ray-data-stats.txt         the last run's per-stage times (Ray Data)
    OUT/.ast-label/neighbours/                the index of `ast-label index` (FAISS segments)

Only the data sits at the top, so every Parquet reader takes OUT as it is (pyarrow.dataset,
pandas, DuckDB's `OUT/*.parquet`, Ray, Hugging Face `datasets`): they all skip hidden folders.
`OutputLocation` is the one object that knows OUT: every module of the output format takes it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import posixpath
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.defaults import META_DIR
from pipeline.errors import UserError
from pipeline.storage import (
    StorageError,
    delete_if_empty,
    error_reason,
    filesystem_for,
    is_local_filesystem,
    join_uri,
    put_file,
    with_retries,
)

METADATA_KEY = b"ast_label"  # the unit files' key-value metadata: JSON (model, labels, settings)
STAGING_DIR = f"{META_DIR}/staging"
COMMITS_DIR = f"{META_DIR}/commits"
INDEX_NAME = f"{META_DIR}/index.jsonl.gz"
SUMMARY_NAME = f"{META_DIR}/summary.json"
STATS_NAME = f"{META_DIR}/ray-data-stats.txt"
# `index,name`, one row per label in score order (index 0-based; SQL lists are 1-based).
LABELS_TABLE_NAME = f"{META_DIR}/labels.csv"
# `index,name,threshold`, one row per label of the output's head in head_scores order.
HEAD_LABELS_TABLE_NAME = f"{META_DIR}/head-labels.csv"

# Unit ids become file names; a leading "_" or "." would hide the final file from readers.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class OutputError(UserError):
    """The output location cannot take this run's results (missing bucket, no write access, a file
    in the way, another model's results); the message says what to do."""


@dataclass(frozen=True)
class OutputLocation:
    """An output folder or prefix. Picklable (it travels to Ray actors as its URI); the filesystem
    is resolved in each process, once (storage.filesystem_for caches it)."""

    uri: str  # an absolute local path, or scheme://bucket/prefix; no trailing "/"

    @classmethod
    def of(cls, uri: str) -> OutputLocation:
        uri = str(uri).rstrip("/")
        if "://" not in uri:
            # Ray workers may run in another working directory than the driver.
            uri = os.path.abspath(os.path.expanduser(uri))
        return cls(uri)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return filesystem_for(self.uri)[0]

    @property
    def root(self) -> str:
        """The output's path inside `fs`."""
        return filesystem_for(self.uri)[1]

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        return join_uri(self.uri, *parts)

    def unit_file(self, unit_id: str) -> str:
        return self.path(unit_file_name(unit_id))

    def marker(self, unit_id: str) -> str:
        return self.path(COMMITS_DIR, f"{unit_id}.json")

    def staging(self, unit_id: str | None = None) -> str:
        return self.path(STAGING_DIR, unit_id) if unit_id else self.path(STAGING_DIR)

    def put(self, name: str, data: bytes) -> None:
        """Writes OUT/<name> whole and atomically (storage.put_file)."""
        put_file(self.fs, self.path(name), data)


def unit_file_name(unit_id: str) -> str:
    return f"{unit_id}.parquet"


def unit_id_of(path: str) -> str:
    """The unit id of a unit file's path: unit_file_name's inverse."""
    return posixpath.basename(path)[: -len(".parquet")]


def check_name(what: str, name: str) -> None:
    if not _SAFE_NAME.match(name):
        raise ValueError(
            f"{what} {name!r} is not a safe file name ([A-Za-z0-9._-], no leading . or _)"
        )


# --- the files that describe an output ---------------------------------------------------------


def labels_table_csv(label_names: Sequence[str], thresholds: Sequence[float] = ()) -> bytes:
    """`index,name` CSV (and `threshold` when given), one row per label in score order; names
    quoted where CSV needs it."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    if thresholds:
        writer.writerow(["index", "name", "threshold"])
        writer.writerows(
            (i, name, f"{t:.6g}")
            for i, (name, t) in enumerate(zip(label_names, thresholds, strict=True))
        )
    else:
        writer.writerow(["index", "name"])
        writer.writerows(enumerate(label_names))
    return text.getvalue().encode()


def write_labels_table(location: OutputLocation, label_names: Sequence[str]) -> str:
    """Writes OUT/.ast-label/labels.csv, the same names as every file's metadata, so that a query
    can find a label's index in `scores` by name (`scores[index + 1]` in SQL). Returns its URI."""
    location.put(LABELS_TABLE_NAME, labels_table_csv(label_names))
    return location.uri_of(LABELS_TABLE_NAME)


def write_head_labels_table(
    location: OutputLocation, label_names: Sequence[str], thresholds: Sequence[float]
) -> str:
    """Writes OUT/.ast-label/head-labels.csv: the head's labels in `head_scores` order with their
    thresholds (`head_scores[index + 1] >= threshold` in SQL is `head_labels`' rule)."""
    location.put(HEAD_LABELS_TABLE_NAME, labels_table_csv(label_names, thresholds))
    return location.uri_of(HEAD_LABELS_TABLE_NAME)


def write_summary(location: OutputLocation, summary: Mapping[str, Any]) -> None:
    location.put(SUMMARY_NAME, json.dumps(summary, indent=2, sort_keys=True).encode())


def write_stats(location: OutputLocation, text: str) -> None:
    """Ray Data's per-operator statistics of the last run: where the time went."""
    location.put(STATS_NAME, text.encode())


# --- before a run: can the output take results ---------------------------------------------------


def check_output_writable(location: OutputLocation) -> None:
    """Fails fast, before any Ray work, when results could not be written: a file where the
    folder should be, a missing bucket, no write or delete access, no credentials. Writes a small
    probe object under the output's hidden folder and deletes it again.

    A missing bucket or a denied access fails at once; a fault of the store (5xx, a dropped
    connection) is retried as every write is, then reported the same way.
    """
    fs, root = location.fs, location.root
    if is_local_filesystem(fs) and os.path.exists(root) and not os.path.isdir(root):
        raise OutputError(f"--output {location.uri} is a file, not a folder: give a folder or URI")
    probe = location.path(META_DIR, f"probe-{uuid.uuid4().hex}")
    try:
        put_file(fs, probe, b"ast-label write probe")
    except StorageError as error:
        # A write whose answer was lost may have happened all the same.
        with contextlib.suppress(Exception):
            fs.rm_file(probe)
        raise OutputError(
            f"cannot write to {location.uri}: {_output_problem(error.__cause__)}"
        ) from None
    try:
        with_retries(lambda: fs.rm_file(probe), f"cannot delete {probe}")
    except StorageError as error:
        raise OutputError(
            f"cannot delete from {location.uri} (runs remove their staged parts): "
            f"{_output_problem(error.__cause__)}"
        ) from None
    delete_if_empty(fs, location.path(META_DIR))


def _output_problem(error: BaseException | None) -> str:
    text = error_reason(error) if error is not None else "unknown error"
    lowered = text.lower()
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        return f"the bucket does not exist ({text}); create it or fix the bucket name"
    if (
        isinstance(error, PermissionError)
        or "accessdenied" in lowered
        or "access denied" in lowered
    ):
        return f"access denied ({text}); check the credentials' permissions on this prefix"
    if "credentials" in lowered:
        return (
            f"no usable AWS credentials ({text}); set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, or run where an instance profile applies"
        )
    if isinstance(error, NotADirectoryError | FileExistsError):
        return f"a file is in the way ({text}); give a folder"
    return f"{text}; check the output location and try again"
