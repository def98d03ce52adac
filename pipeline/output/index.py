"""The commit markers of an output, read fast: every marker's fields cached in one index file.

The index (OUT/.ast-label/index.jsonl.gz) is a cache of the markers, never the commit point: a
rerun lists the markers (one LIST per 1000 on S3), takes the fields of those older than the index
from it, and reads only the rest.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.output.commit import CommittedUnit
from pipeline.output.layout import COMMITS_DIR, INDEX_NAME, OutputLocation
from pipeline.storage import StorageError, list_folder, modified_s, read_files, with_retries

log = logging.getLogger(__name__)

# Markers the index did not cover, read at the start of a run, beyond which it is rewritten at once.
INDEX_REFRESH_AFTER = 1000
# Markers fetched by one request batch when the index does not cover them.
MARKER_READ_BATCH = 1000


def list_markers(location: OutputLocation) -> dict[str, float | None]:
    """unit id -> modification time (s) of every commit marker of the output. Raises StorageError
    when the store keeps failing."""
    fs, commits = location.fs, location.path(COMMITS_DIR)
    listing = with_retries(lambda: list_folder(fs, commits, detail=True), f"cannot list {commits}")
    return {
        posixpath.basename(info["name"])[: -len(".json")]: modified_s(info)
        for info in listing
        if info["name"].endswith(".json") and not posixpath.basename(info["name"]).startswith(".")
    }


def read_commit_markers(
    location: OutputLocation, refresh_index: bool = True
) -> dict[str, CommittedUnit]:
    """Every committed unit's marker fields: the markers listed (the commit points), their fields
    taken from the index where it is newer than the marker, read otherwise; the index rewritten
    when many were read (not with `refresh_index=False`: an output only read, never written).
    Raises StorageError when the output cannot be listed or read."""
    listed = list_markers(location)
    index, index_modified = _read_index(location, listed)
    units = {
        unit_id: index[unit_id]
        for unit_id, modified in listed.items()
        if unit_id in index and modified is not None and modified < index_modified
    }
    del index
    missing = [unit_id for unit_id in listed if unit_id not in units]
    for start in range(0, len(missing), MARKER_READ_BATCH):
        batch = missing[start : start + MARKER_READ_BATCH]
        paths = [location.marker(unit_id) for unit_id in batch]
        blobs = read_files(location.fs, paths, f"cannot read markers under {location.uri}")
        for unit_id, path, blob in zip(batch, paths, blobs, strict=True):
            try:
                unit = CommittedUnit.from_marker(json.loads(blob))
                valid = unit.unit_id == unit_id
            except (ValueError, KeyError, TypeError):
                valid = False
            if valid:
                units[unit_id] = unit
            else:  # never written by commit_unit (its writes are atomic): redo that unit
                log.warning("ignoring unreadable commit marker %s", path)
    if refresh_index and len(missing) > INDEX_REFRESH_AFTER:
        # A run killed before writing its index: save the next run these reads. Only a cache
        # (the markers stay the commit points): a store that fails it costs a warning.
        try:
            write_index(location, units.values())
        except StorageError as error:
            log.warning("could not write the markers' index (%s); the next run writes it", error)
    return units


def write_index(location: OutputLocation, units: Iterable[CommittedUnit]) -> None:
    """Saves every committed unit of the output in one file, so that a rerun need not read every
    marker: gzip of JSON lines, a few MB for 100k tar shards."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=5, mtime=0) as compressed:
        for unit in units:
            compressed.write(json.dumps(unit.to_record(), sort_keys=True).encode() + b"\n")
    location.put(INDEX_NAME, buffer.getvalue())


def _read_index(
    location: OutputLocation, wanted: Mapping[str, Any]
) -> tuple[dict[str, CommittedUnit], float]:
    """(unit_id -> unit for the `wanted` ids it holds, the index's modification time); ({}, -inf)
    when there is no usable index. Parsed line by line: the whole text is never held at once."""
    fs, path = location.fs, location.path(INDEX_NAME)
    try:
        modified = modified_s(with_retries(lambda: fs.info(path), f"cannot read {path}"))
        data = with_retries(lambda: fs.cat_file(path), f"cannot read {path}")
        index = {}
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as lines:
            for line in lines:
                if line.strip():
                    unit = CommittedUnit.from_marker(json.loads(line))
                    if unit.unit_id in wanted:
                        index[unit.unit_id] = unit
    except StorageError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            return {}, -math.inf
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable index %s", path)
        return {}, -math.inf
    return index, (modified if modified is not None else -math.inf)
