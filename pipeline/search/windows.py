"""An output's window embeddings, read a row group at a time: what every search reads.

A unit file's row groups are about 64 MiB (pipeline.output.schema.ROW_GROUP_BYTES), so reading
one at a time on a few threads keeps memory at a few row groups whatever the output's size:

    committed unit files (pipeline.output.reader)
      -> their row groups, in order (footers read a few units ahead)
      -> WindowBatch: the labeled windows of one row group (B, D) and their norms (cosine =
         raw @ query / norm, without a normalised copy), with where each came from: unit id,
         row in the unit file, file ordinal in the unit

A unit file is sorted by (key, window), so a file's windows are consecutive rows, and a file's
ordinal (0, 1, 2... in the unit) is counted as the keys change, across row groups. Error rows
(null embedding) and zero vectors have no direction and are left out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.output.layout import unit_id_of
from pipeline.output.reader import CommittedOutput, embedding_size, list_matrix

T = TypeVar("T")
R = TypeVar("R")

# Row groups read at once: enough to keep two cores busy decompressing and to hide an object
# store's latency; each is about 64 MiB in memory.
READ_THREADS = 4
# Unit footers read ahead of the row groups (one small read each).
FOOTERS_AHEAD = 8


@dataclass(frozen=True)
class WindowBatch:
    """The labeled windows of one row group of one unit file."""

    unit_id: str
    rows: np.ndarray  # (B,) int64: row in the unit file
    files: np.ndarray  # (B,) int64: file ordinal in the unit, non-decreasing
    raw: np.ndarray  # (B, D) float32 as stored
    norms: np.ndarray  # (B,) float32, all finite and > 0
    columns: dict[str, np.ndarray]  # the extra columns asked for, (B,) each

    @property
    def vectors(self) -> np.ndarray:
        """(B, D) float32 of unit length (a copy)."""
        return self.raw / self.norms[:, None]

    def similarity(self, query: np.ndarray) -> np.ndarray:
        """(B,) cosine of each window with a unit-length query (D,)."""
        return (self.raw @ query) / self.norms


def search_dim(output: CommittedOutput) -> int:
    """D, the size of the embeddings searched; NoEmbeddings (exit 2) when there are none."""
    return embedding_size(output, "nothing to search")


def unit_lengths(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> (the rows of finite, non-zero vectors, (M, D) float32 of unit length)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = row_norms(vectors)
    keep = np.flatnonzero(np.isfinite(norms) & (norms > 0))
    return keep, vectors[keep] / norms[keep, None]


def row_norms(vectors: np.ndarray) -> np.ndarray:
    """(N, D) -> (N,) Euclidean norms, without an (N, D) temporary."""
    return np.sqrt(np.einsum("ij,ij->i", vectors, vectors))


def scan_windows(
    output: CommittedOutput,
    unit_paths: Sequence[str] | None = None,
    extra_columns: Sequence[str] = (),
    on_unit: Callable[[int], None] | None = None,
) -> Iterator[WindowBatch]:
    """Every labeled window of the units (default: all committed), unit by unit in order, each
    row group as one WindowBatch. `on_unit(rows)` is called as each unit is finished (progress).
    Raises NoEmbeddings, UnreadableOutput, or StorageError when the store keeps failing."""
    dim = search_dim(output)
    columns = ["key", "error", "embedding", *extra_columns]
    paths = list(output.files if unit_paths is None else unit_paths)
    fragments = {fragment.path: fragment for fragment in output.dataset().get_fragments()}
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:

        def split(path: str) -> list[tuple[str, pads.ParquetFileFragment, int, int]]:
            groups = output.read_unit_file(lambda: fragments[path].split_by_row_group(), path)
            sizes = [group.row_groups[0].num_rows for group in groups]
            firsts = np.concatenate([[0], np.cumsum(sizes)])
            total = int(firsts[-1])
            return [
                (path, group, int(first), total)
                for group, first in zip(groups, firsts, strict=False)
            ]

        def read(task: tuple[str, pads.ParquetFileFragment, int, int]) -> pa.Table:
            path, group, _, _ = task
            return output.read_unit_file(lambda: group.to_table(columns=columns), path)

        groups = (task for tasks in in_order(pool, split, paths, FOOTERS_AHEAD) for task in tasks)
        tasks: deque = deque()
        tables = in_order(pool, read, _recorded(groups, tasks), READ_THREADS)
        counter = _FileCounter()
        for table in tables:
            path, _, first_row, total = tasks.popleft()
            unit_id = unit_id_of(path)
            files = counter.ordinals(unit_id, table["key"])  # (N,)
            yield _window_batch(table, unit_id, first_row, files, dim, extra_columns)
            if on_unit is not None and first_row + table.num_rows == total:
                on_unit(total)


def in_order(
    pool: ThreadPoolExecutor, call: Callable[[T], R], items: Iterable[T], ahead: int
) -> Iterator[R]:
    """call(item) for each item on the pool, results in the items' order, at most `ahead` in
    flight (memory stays bounded however many items there are)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(call, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _recorded(items: Iterable[T], record: deque) -> Iterator[T]:
    """The items, each appended to `record` as it is handed on (in_order keeps their order)."""
    for item in items:
        record.append(item)
        yield item


class _FileCounter:
    """Counts files through a unit's row groups: a file's windows may straddle two of them."""

    def __init__(self) -> None:
        self.unit_id = ""
        self.next_file = 0
        self.last_key: str | None = None

    def ordinals(self, unit_id: str, key: pa.ChunkedArray) -> np.ndarray:
        """(N,) each row's file ordinal in the unit (rows sorted by key, as units are)."""
        if unit_id != self.unit_id:
            self.unit_id, self.next_file, self.last_key = unit_id, 0, None
        keys = key.combine_chunks()
        if len(keys) == 0:
            return np.zeros(0, dtype=np.int64)
        new_file = np.ones(len(keys), dtype=bool)  # (N,) the row starts a file
        if len(keys) > 1:
            same = pc.equal(keys.slice(1), keys.slice(0, len(keys) - 1))
            new_file[1:] = ~np.asarray(same.fill_null(False))
        new_file[0] = keys[0].as_py() != self.last_key
        ordinals = np.cumsum(new_file) - 1 + self.next_file
        self.next_file = int(ordinals[-1]) + 1
        self.last_key = keys[-1].as_py()
        return ordinals


def _window_batch(
    table: pa.Table,
    unit_id: str,
    first_row: int,
    files: np.ndarray,
    dim: int,
    extra_columns: Sequence[str],
) -> WindowBatch:
    ok = np.asarray(pc.is_null(table["error"])) & np.asarray(pc.is_valid(table["embedding"]))
    raw = list_matrix(table["embedding"], dim)  # (N, D), a view of the Arrow buffer
    with np.errstate(invalid="ignore", over="ignore"):  # error rows' slots hold anything
        norms = row_norms(raw)  # (N,)
    usable = ok & np.isfinite(norms) & (norms > 0)
    rows = np.flatnonzero(usable)  # (B,) rows of the row group
    if len(rows) < len(raw):
        raw = raw[rows]
    columns = {name: _column(table[name])[rows] for name in extra_columns}
    return WindowBatch(unit_id, rows + first_row, files[rows], raw, norms[rows], columns)


def _column(column: pa.ChunkedArray) -> np.ndarray:
    return column.combine_chunks().to_numpy(zero_copy_only=False)
