"""The row contract: the columns that travel between the stages of a run, written down once.

A batch is a `dict[str, np.ndarray]` with one entry per column, all of the same length B. Every
stage and the writer refer to these names; nothing else crosses a process boundary.

    read (ReadStage, in the read tasks of WorkUnitSource: fetch, decode, window, fbank)
        unit_id       object str   the work unit the row belongs to
        shard         object str   the tar URI, or the file group's id
        key           object str   WebDataset key in the tar, or the file URI
        window_index  int32        which window of the file (0 for an error row)
        start_s       float64      window start in the source file
        end_s         float64      window end, never past duration_s
        duration_s    float64      of the source file (0 when it could not be decoded)
        sample_rate   int32        of the source file (0 when unknown)
        metadata      object str   the sample's .json member; "" = none
        error         object str   why the file has no labels (its bytes are bad); "" = labeled
        unit_failure  object str   why the whole unit must not commit (storage, not data); ""
        unit_rows     int32        0, except on a unit's last row: the unit's row count
        frames        int32        fbank frames that hold the window's audio (<= T); 0 = none
        source_bytes  int64        the file's bytes, on its first row (window 0 or its error
                                   row); 0 on the others: how far through its input a run is
        fbank         (B, T, F)    normalised log-mel in the classifier's input dtype (see below)
    classify (Classify, in the classifier actors) drops fbank and adds
        embedding     (B, D) float32   pooled output; zeros on rows that are not labeled
        scores        (B, C) float32   sigmoid or softmax; zeros on rows that are not labeled
        top_index     (B, k) int32     label ids by descending score
        head_scores   (B, H) float32   with --head: the head's scores; zeros on rows not labeled
    stage (output.staging.write_staging_parts, in the same actors) writes the batch as staged
    Parquet parts and returns one record per unit in it, which is all that reaches the driver
        unit_id, part_uri, rows, unit_rows, unit_failure and the batch's files, windows,
        errors, audio_s, source_bytes of the unit          (output.staging.RECORD_COLUMNS)

Null strings travel as "": a block whose values were all None would get Arrow's null type, come
back from Ray as float NaN, and then fail to merge with a block of strings. The writer turns ""
back into null.

How a unit's end is known: its rows may be spread over many blocks, so the read task holds the
unit's last row back until the unit is finished and writes the unit's total row count on it. The
driver counts staged rows per unit and commits the unit when the count reaches that total.

How a unit fails: a storage fault that outlasts the retries (not the data's fault) ends the unit
with one extra row whose `unit_failure` says why; that row also carries `unit_rows`. The driver
then never commits the unit, and a rerun reads it again.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Batch = Mapping[str, np.ndarray]

UNIT_ID = "unit_id"
SHARD = "shard"
KEY = "key"
WINDOW_INDEX = "window_index"
START_S = "start_s"
END_S = "end_s"
DURATION_S = "duration_s"
SAMPLE_RATE = "sample_rate"
METADATA = "metadata"
ERROR = "error"
UNIT_FAILURE = "unit_failure"
UNIT_ROWS = "unit_rows"
FRAMES = "frames"
SOURCE_BYTES = "source_bytes"
FBANK = "fbank"
EMBEDDING = "embedding"
SCORES = "scores"
TOP_INDEX = "top_index"
HEAD_SCORES = "head_scores"

# The columns that describe a row, from the read stage to the writer (everything but tensors).
ROW_COLUMNS = (
    UNIT_ID,
    SHARD,
    KEY,
    WINDOW_INDEX,
    START_S,
    END_S,
    DURATION_S,
    SAMPLE_RATE,
    METADATA,
    ERROR,
    UNIT_FAILURE,
    UNIT_ROWS,
    FRAMES,
    SOURCE_BYTES,
)
ROW_DTYPES = {
    UNIT_ID: object,
    SHARD: object,
    KEY: object,
    WINDOW_INDEX: np.int32,
    START_S: np.float64,
    END_S: np.float64,
    DURATION_S: np.float64,
    SAMPLE_RATE: np.int32,
    METADATA: object,
    ERROR: object,
    UNIT_FAILURE: object,
    UNIT_ROWS: np.int32,
    FRAMES: np.int32,
    SOURCE_BYTES: np.int64,
}

# The fbank column's numpy dtype per classifier input dtype. numpy has no bfloat16: bf16 travels
# as its raw 16 bits (uint16) and the classifier views them as torch.bfloat16 again, bit for bit.
FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def empty_row(unit_id: str, shard: str, key: str) -> dict:
    """A row's descriptive values with every optional one at its "nothing" value."""
    return {
        UNIT_ID: unit_id,
        SHARD: shard,
        KEY: key,
        WINDOW_INDEX: 0,
        START_S: 0.0,
        END_S: 0.0,
        DURATION_S: 0.0,
        SAMPLE_RATE: 0,
        METADATA: "",
        ERROR: "",
        UNIT_FAILURE: "",
        UNIT_ROWS: 0,
        FRAMES: 0,
        SOURCE_BYTES: 0,
    }


def rows_to_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Row dicts (as made by empty_row) -> the descriptive columns of a batch."""
    columns = {}
    for name in ROW_COLUMNS:
        values = [row[name] for row in rows]
        if ROW_DTYPES[name] is object:
            column = np.empty(len(values), dtype=object)
            column[:] = ["" if value is None else value for value in values]
        else:
            column = np.asarray(values, dtype=ROW_DTYPES[name])
        columns[name] = column
    return columns


def labeled_rows(batch: Batch) -> np.ndarray:
    """(B,) bool: rows that hold audio to classify (no error, not a unit-failure row)."""
    pairs = zip(batch[ERROR], batch[UNIT_FAILURE], strict=True)
    return np.array([not error and not failure for error, failure in pairs], dtype=bool)
