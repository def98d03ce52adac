"""The commit protocol: a unit's staged parts become one unit file and a marker, exactly once.

One naming scheme: rows are *staged* (parts under OUT/.ast-label/staging/<unit>/, written by the
classifier actors, see staging.py); the `StagingLedger` counts a unit's staged rows until it is
a `StagedUnit` (its total is known and every row is in); `commit_unit` merges exactly the parts it
was told about into OUT/<unit>.parquet, written in one atomic step, then writes the unit's commit
marker, OUT/.ast-label/commits/<unit>.json: from then on it is a `CommittedUnit`. The `Committer`
drives this on the driver while the stream goes on.

A rerun skips units whose marker and file are there (resume.py) and redoes the rest, overwriting
the same deterministic file names, so nothing is duplicated or lost whatever point a run was
killed at. A unit whose storage failed (see pipeline.rows) is never committed; its staging is
removed, and a rerun reads it again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import astuple, dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import rows
from pipeline.output.layout import OutputLocation, check_name, unit_file_name
from pipeline.output.schema import OutputSpec
from pipeline.output.staging import COUNT_COLUMNS
from pipeline.storage import (
    StorageError,
    delete_if_empty,
    delete_path_once,
    error_reason,
    filesystem_for,
    put_file,
    read_files,
)

MARKER_VERSION = 2
# Distinct error reasons kept per marker; the rest are counted under one entry.
MAX_ERROR_REASONS = 50


# --- counting staged rows (driver) ---------------------------------------------------------------


@dataclass(frozen=True)
class StagedUnit:
    """A unit whose rows are all staged: ready to commit."""

    unit_id: str
    part_uris: tuple[str, ...]
    rows: int


@dataclass(frozen=True)
class StagedCounts:
    """What staged rows hold (staging.COUNT_COLUMNS, in that order): the progress display adds
    them up."""

    files: int = 0
    windows: int = 0
    errors: int = 0
    audio_s: float = 0.0
    source_bytes: int = 0

    @classmethod
    def of(cls, records: rows.Batch) -> StagedCounts:
        return cls(*(records[name].sum().item() for name in COUNT_COLUMNS))

    def __add__(self, other: StagedCounts) -> StagedCounts:
        return StagedCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass
class _Parts:
    part_uris: list[str] = field(default_factory=list)
    rows: int = 0
    total: int = 0  # 0 until the record carrying the unit's total arrives


class StagingLedger:
    """Counts staged rows per unit from the staging records (staging.RECORD_COLUMNS); a unit is
    staged when its total is known and all its rows are in.

    Holds only units in flight: a staged unit is forgotten. A unit that fails (a record with
    `unit_failure`, or more rows than its total, which would mean rows arriving twice) is moved to
    `failed` and everything that arrives for it later is ignored: it is never committed.
    """

    def __init__(self) -> None:
        self._units: dict[str, _Parts] = {}
        self.failed: dict[str, str] = {}  # unit_id -> why it did not commit
        self._unreported: list[str] = []  # failed units not yet handed out by new_failures()

    def add(self, records: rows.Batch) -> list[StagedUnit]:
        staged: list[StagedUnit] = []
        for unit_id, part_uri, count, total, failure in zip(
            records["unit_id"],
            records["part_uri"],
            records["rows"],
            records["unit_rows"],
            records[rows.UNIT_FAILURE],
            strict=True,
        ):
            unit_id, part_uri, count, total = str(unit_id), str(part_uri), int(count), int(total)
            if unit_id in self.failed:
                continue
            if failure:
                self.fail(unit_id, str(failure))
                continue
            unit = self._units.setdefault(unit_id, _Parts())
            if part_uri in unit.part_uris:
                continue  # the same record seen twice names the same rows: count them once
            if total and unit.total and total != unit.total:
                self.fail(unit_id, f"two different row totals, {unit.total} and {total}")
                continue
            unit.total = total or unit.total
            unit.part_uris.append(part_uri)
            unit.rows += count
            if unit.total and unit.rows > unit.total:
                self.fail(
                    unit_id,
                    f"{unit.rows} rows staged but the unit has {unit.total} (rows arrived twice)",
                )
            elif unit.total and unit.rows == unit.total:
                staged.append(StagedUnit(unit_id, tuple(unit.part_uris), unit.rows))
                del self._units[unit_id]
        return staged

    def fail(self, unit_id: str, reason: str) -> None:
        self._units.pop(unit_id, None)
        if unit_id not in self.failed:  # the first reason stands; a unit is reported once
            self.failed[unit_id] = reason
            self._unreported.append(unit_id)

    def new_failures(self) -> list[tuple[str, str]]:
        """(unit_id, reason) of the units failed since the last call, in the order they failed."""
        failures = [(unit_id, self.failed[unit_id]) for unit_id in self._unreported]
        self._unreported = []
        return failures

    @property
    def pending(self) -> dict[str, tuple[int, int]]:
        """unit_id -> (rows staged, total or 0 when unknown) for units not yet staged whole."""
        return {unit_id: (unit.rows, unit.total) for unit_id, unit in self._units.items()}


# --- committing one unit (a plain function: driver thread or Ray task) ---------------------------


def commit_unit(spec: OutputSpec, unit: StagedUnit, sources: Sequence[str]) -> dict[str, Any]:
    """Merges a unit's staged parts into OUT/<unit_id>.parquet, writes its marker, clears staging.

    The unit file appears in one atomic step, then the marker (the commit point), then the unit's
    whole staging folder goes, including parts of killed earlier runs that no ledger listed.
    Committing again writes the same file bytes. Returns the marker. Raises StorageError when the
    store fails after the retries (the unit then stays uncommitted).
    """
    check_name("unit id", unit.unit_id)
    location = spec.location
    part_paths = [filesystem_for(uri)[1] for uri in unit.part_uris]
    blobs = read_files(location.fs, part_paths, f"cannot read staged parts of {unit.unit_id}")
    tables = [pq.read_table(pa.BufferReader(blob)) for blob in blobs]
    table = pa.concat_tables(tables) if tables else spec.schema.empty_table()
    if table.num_rows != unit.rows:
        raise RuntimeError(
            f"unit {unit.unit_id}: staged parts hold {table.num_rows} rows, expected {unit.rows}"
        )
    if not table.schema.equals(spec.schema, check_metadata=False):
        raise RuntimeError(f"unit {unit.unit_id}: staged parts do not have this run's schema")
    marker = commit_table(spec, unit.unit_id, sources, _sorted(table))
    # Best effort: a rerun removes staging of committed units that a failure here left behind.
    with contextlib.suppress(Exception):
        delete_path_once(location.fs, location.staging(unit.unit_id))
    return marker


def commit_table(
    spec: OutputSpec, unit_id: str, sources: Sequence[str], table: pa.Table
) -> dict[str, Any]:
    """Writes a whole unit's rows (in the spec's schema, sorted) as OUT/<unit_id>.parquet in one
    atomic step, then its marker: the commit point. Returns the marker; StorageError when the
    store fails after the retries (the unit then stays uncommitted, its file taken away)."""
    check_name("unit id", unit_id)
    location = spec.location
    fs = location.fs
    data = spec.parquet_bytes(table.replace_schema_metadata(spec.schema.metadata))
    unit_file = location.unit_file(unit_id)
    marker = {
        "version": MARKER_VERSION,
        "unit_id": unit_id,
        "sources": list(sources),
        "file": unit_file_name(unit_id),
        "bytes": len(data),
        **_unit_counts(table),
        "model_fingerprint": spec.model_fingerprint,
        "run_id": spec.run_id,
        "committed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        put_file(fs, unit_file, data)
        marker_bytes = json.dumps(marker, indent=2, sort_keys=True).encode()
        put_file(fs, location.marker(unit_id), marker_bytes)
    except StorageError:
        # A write reported failed may have happened (its answer lost): take the unit file away
        # again, so that readers do not see rows of a unit the run reports as not committed. A
        # marker that did get written then counts for nothing without its file: redone.
        with contextlib.suppress(Exception):
            delete_path_once(fs, unit_file)
        raise
    return marker


def remove_staging(location: OutputLocation, unit_id: str | None) -> None:
    """Deletes a unit's staged parts (a unit that will not commit in this run), or with None the
    staging folder when it is empty; best effort."""
    if unit_id is None:
        delete_if_empty(location.fs, location.staging())
        return
    with contextlib.suppress(Exception):
        delete_path_once(location.fs, location.staging(unit_id))


def _sorted(table: pa.Table) -> pa.Table:
    # error breaks the tie of a duplicate key's error row with that key's first window, so the
    # order (and the file bytes) do not depend on how batches happened to arrive. Nulls become ""
    # so the order is the same whatever pyarrow's null-placement defaults.
    sort_columns = pa.table(
        {
            "key": table["key"],
            "window_index": table["window_index"],
            "error": pc.fill_null(table["error"], ""),
        }
    )
    order = pc.sort_indices(
        sort_columns, sort_keys=[(name, "ascending") for name in sort_columns.column_names]
    )
    return table.take(order)


def _unit_counts(table: pa.Table) -> dict[str, Any]:
    """Marker counts. audio_seconds: each labeled file's source duration counted once (windows
    may overlap, so summing window lengths would count audio twice)."""
    ok = table.filter(pc.is_null(table["error"]))
    durations = ok.group_by("key").aggregate([("duration_s", "max")])["duration_s_max"]
    reasons = Counter(table["error"].drop_null().to_pylist())
    kept = dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))[:MAX_ERROR_REASONS])
    if len(reasons) > len(kept):
        kept["(other reasons)"] = sum(reasons.values()) - sum(kept.values())
    return {
        "rows": table.num_rows,
        "files": pc.count_distinct(table["key"], mode="all").as_py(),
        "windows": ok.num_rows,
        "errors": table.num_rows - ok.num_rows,
        "audio_seconds": round(float(pc.sum(durations).as_py() or 0.0), 6),
        "error_reasons": kept,
    }


# --- a committed unit ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommittedUnit:
    """What a run needs of a committed unit: the fields of its marker that the resume checks and
    the summary read. It is also one line of the markers' index. Kept small: a rerun over 100k
    units holds one per unit on the driver."""

    unit_id: str
    sources: tuple[str, ...]
    model_fingerprint: str
    files: int
    windows: int
    errors: int
    audio_seconds: float
    error_reasons: Mapping[str, int]

    @classmethod
    def from_marker(cls, marker: Mapping[str, Any]) -> CommittedUnit:
        reasons = marker.get("error_reasons") or {}
        return cls(
            unit_id=str(marker["unit_id"]),
            sources=tuple(marker.get("sources", ())),
            # Every unit of an output has the same fingerprint: one string for all of them.
            model_fingerprint=sys.intern(str(marker.get("model_fingerprint", ""))),
            files=int(marker["files"]),
            windows=int(marker["windows"]),
            errors=int(marker["errors"]),
            audio_seconds=float(marker["audio_seconds"]),
            error_reasons=dict(reasons) if reasons else _NO_REASONS,
        )

    def to_record(self) -> dict[str, Any]:
        record = {name: getattr(self, name) for name in self.__slots__}
        record["sources"] = list(self.sources)
        record["error_reasons"] = dict(self.error_reasons)
        return record


_NO_REASONS: Mapping[str, int] = MappingProxyType({})


# --- the driver's side: commits while the stream goes on -----------------------------------------


class CommitListener(Protocol):
    """Told of every outcome as it happens (the progress display)."""

    def rows_staged(self, counts: StagedCounts) -> None: ...

    def unit_committed(self, unit: CommittedUnit) -> None: ...

    def unit_failed(self, unit_id: str, reason: str) -> None: ...

    def waiting(self) -> None: ...


@dataclass
class CommitOutcome:
    committed: dict[str, CommittedUnit]  # this run's committed units
    failed: dict[str, str]  # unit id -> why it did not commit: a rerun labels it


class Committer:
    """Feeds the staging records of a run to a ledger and commits each unit once it is staged.

    On a cluster the commits are small Ray tasks, spread over the nodes. On this machine alone
    (in_driver) a few threads of the driver run them: a commit is mostly I/O and Parquet
    encoding (about 0.3 ms of CPU per clip), and a worker process of its own would cost more
    to start (2 CPU-s of imports) than all the commits of a run on a laptop.
    """

    def __init__(
        self,
        spec: OutputSpec,
        sources: Mapping[str, tuple[str, ...]],
        max_in_flight: int,
        listener: CommitListener | None = None,
        in_driver: bool = True,
    ):
        self.spec = spec
        self.sources = sources  # unit id -> its input URIs, for every unit of the run
        self.max_in_flight = max_in_flight
        self.listener = listener
        if in_driver:
            self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="commit")
            self._start = functools.partial(self._pool.submit, commit_unit)
        else:
            import ray

            self._pool = None
            task = ray.remote(num_cpus=0.25)(commit_unit)
            self._start = lambda *args: task.remote(*args).future()
        self._in_flight: dict[Future, str] = {}  # -> unit id
        self.committed: dict[str, CommittedUnit] = {}
        self.failed: dict[str, str] = {}

    def run(self, record_batches: Iterable[rows.Batch]) -> CommitOutcome:
        """Consumes the staging records (staging.RECORD_COLUMNS) to their end, committing as it
        goes; then every unit of the run is either committed or failed with a reason."""
        ledger = StagingLedger()
        try:
            for records in record_batches:
                if self.listener:
                    self.listener.rows_staged(StagedCounts.of(records))
                for unit in ledger.add(records):
                    self._submit(unit)
                for unit_id, reason in ledger.new_failures():
                    self._fail(unit_id, reason)
                self._collect(wait=False)
            self._collect(wait=True)
        finally:
            if self._pool is not None:
                # Interrupted: commits running end (each is quick), those not started never do;
                # those that ended count, so that the interruption says what was kept.
                self._pool.shutdown(wait=True, cancel_futures=True)
                for future in [f for f in self._in_flight if f.cancelled()]:
                    self._in_flight.pop(future)
                if self._in_flight:
                    self._wait(timeout=0, every=True)
        failed = dict(self.failed)
        for unit_id, (count, total) in ledger.pending.items():  # a bug, never the data: say so
            failed.setdefault(unit_id, f"only {count} of {total or '?'} rows reached the writer")
        for unit_id in self.sources:
            if unit_id not in self.committed:
                failed.setdefault(unit_id, "no rows reached the writer")
        for unit_id in failed:
            remove_staging(self.spec.location, unit_id)
        remove_staging(self.spec.location, None)
        return CommitOutcome(self.committed, failed)

    def _submit(self, unit: StagedUnit) -> None:
        future = self._start(self.spec, unit, self.sources[unit.unit_id])
        self._in_flight[future] = unit.unit_id
        while len(self._in_flight) >= self.max_in_flight:
            self._wait(timeout=None, every=False)

    def _fail(self, unit_id: str, reason: str) -> None:
        self.failed.setdefault(unit_id, reason)
        if self.listener:
            self.listener.unit_failed(unit_id, reason)

    def _collect(self, wait: bool) -> None:
        if self._in_flight:
            self._wait(timeout=None if wait else 0, every=wait)
        if self.listener:
            self.listener.waiting()

    def _wait(self, timeout: float | None, every: bool) -> None:
        finished, _ = futures_wait(
            list(self._in_flight),
            timeout=timeout,
            return_when=ALL_COMPLETED if every else FIRST_COMPLETED,
        )
        for future in finished:
            unit_id = self._in_flight.pop(future)
            try:
                marker = future.result()
            except Exception as error:  # the store, after the retries; a lost worker
                cause = getattr(error, "cause", None) or error  # a Ray task's own exception
                self._fail(unit_id, f"commit failed: {error_reason(cause)}")
                continue
            unit = CommittedUnit.from_marker(marker)
            self.committed[unit_id] = unit
            if self.listener:
                self.listener.unit_committed(unit)
