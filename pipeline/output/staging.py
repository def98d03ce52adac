"""Staging: a batch of classified rows written as parts under OUT/.ast-label/staging/<unit_id>/.

The classifier actors call `write_staging_parts` on every batch they classify, so results never
cross a process boundary; what leaves the actor is one small record per unit in the batch, which
the driver's `commit.Committer` counts until the unit is complete (see pipeline.output.commit).
"""

from __future__ import annotations

import uuid

import numpy as np

from pipeline import rows
from pipeline.output.layout import STAGING_DIR, check_name
from pipeline.output.schema import OutputSpec, rows_to_table
from pipeline.storage import StorageError

# The records a staging write returns, one per unit of the batch:
#   unit_id       the unit
#   part_uri      the part written ("" when none was: the unit failed)
#   rows          rows of the unit in this batch
#   unit_rows     the unit's total row count when this batch holds the row that carries it, else 0
#   unit_failure  why the unit must not commit (storage, not data), else ""
#   files, windows, errors, audio_s, source_bytes   what the batch's rows of the unit hold: files
#                 started (their first rows), labeled windows, error rows, the labeled files'
#                 audio seconds and input bytes; the progress display counts them as they come
COUNT_COLUMNS = ("files", "windows", "errors", "audio_s", "source_bytes")
RECORD_COLUMNS = ("unit_id", "part_uri", "rows", "unit_rows", rows.UNIT_FAILURE, *COUNT_COLUMNS)


def write_staging_parts(batch: rows.Batch, spec: OutputSpec) -> dict[str, np.ndarray]:
    """Writes one staging part per unit present in the batch; returns one record per unit
    (RECORD_COLUMNS). A unit whose batch rows carry a unit failure gets no part."""
    unit_ids = np.asarray(batch[rows.UNIT_ID]).astype(str)
    unit_rows = np.asarray(batch[rows.UNIT_ROWS], dtype=np.int64)
    unit_failure = batch[rows.UNIT_FAILURE]
    ids, group_of_row = np.unique(unit_ids, return_inverse=True)
    failures = {str(unit_ids[i]): str(reason) for i, reason in enumerate(unit_failure) if reason}
    labeled = np.array([not failure for failure in unit_failure], dtype=bool)
    if labeled.all():  # the usual case: no copy of the batch through the mask
        table = rows_to_table(batch, spec)
    else:
        table = rows_to_table({name: values[labeled] for name, values in batch.items()}, spec)
    table_row = np.cumsum(labeled) - 1  # batch row -> its row in `table`
    location = spec.location
    counts = _row_counts(batch, labeled)  # name -> (B,)
    records: dict[str, list] = {name: [] for name in RECORD_COLUMNS}
    for group, unit_id in enumerate(ids):
        check_name("unit id", unit_id)
        in_unit = np.flatnonzero(group_of_row == group)
        failure, part_uri = failures.get(unit_id, ""), ""
        if not failure:
            part = f"{STAGING_DIR}/{unit_id}/{spec.run_id}-{uuid.uuid4().hex}.parquet"
            data = spec.parquet_bytes(table.take(table_row[in_unit]))
            try:
                location.put(part, data)
                part_uri = location.uri_of(part)
            except StorageError as error:
                failure = f"staging write failed: {error}"
        records["unit_id"].append(unit_id)
        records["part_uri"].append(part_uri)
        records["rows"].append(len(in_unit))
        records["unit_rows"].append(int(unit_rows[in_unit].max()))
        records[rows.UNIT_FAILURE].append(failure)
        for name, values in counts.items():
            records[name].append(values[in_unit].sum())
    return {
        "unit_id": np.array(records["unit_id"], dtype=object),
        "part_uri": np.array(records["part_uri"], dtype=object),
        "rows": np.array(records["rows"], dtype=np.int64),
        "unit_rows": np.array(records["unit_rows"], dtype=np.int64),
        rows.UNIT_FAILURE: np.array(records[rows.UNIT_FAILURE], dtype=object),
        **{name: np.array(records[name], dtype=counts[name].dtype) for name in COUNT_COLUMNS},
    }


def _row_counts(batch: rows.Batch, labeled: np.ndarray) -> dict[str, np.ndarray]:
    """Per row (B,): what it adds to each of COUNT_COLUMNS; unit-failure rows add nothing."""
    error = np.array([bool(reason) for reason in batch[rows.ERROR]], dtype=bool)
    first = (np.asarray(batch[rows.WINDOW_INDEX]) == 0) & labeled
    ok = labeled & ~error
    return {
        "files": first.astype(np.int64),
        "windows": ok.astype(np.int64),
        "errors": (labeled & error).astype(np.int64),
        "audio_s": np.where(first & ok, np.asarray(batch[rows.DURATION_S], np.float64), 0.0),
        "source_bytes": np.where(labeled, np.asarray(batch[rows.SOURCE_BYTES], np.int64), 0),
    }
