"""Exact search: one streaming pass over the embeddings, keeping the best window of each file.

A file's similarity to the query is that of its best window (the highest cosine). Per row group:

    vectors (B, D) @ query (D,)            -> similarity of every window (B,)
    grouped by file (consecutive rows)     -> each file's best window: similarity, row
    merged into BestFiles                  -> the `keep` best files so far

Memory: the row groups in flight (windows.READ_THREADS of about 64 MiB) and a few times `keep`
files, whatever the output's size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.output.reader import CommittedOutput
from pipeline.search.windows import scan_windows

# BestFiles prunes back to `keep` files once it holds this many times as many.
PRUNE_FACTOR = 4


@dataclass(frozen=True)
class FileHit:
    """A file's best window: the file is (unit_id, file ordinal in the unit)."""

    unit_id: str
    file: int
    row: int  # the best window's row in the unit file
    similarity: float


class BestFiles:
    """The best window of each file seen, and the `keep` best files.

    Pruning is exact: a file dropped while below the keep-th best can only come back with a
    better window, which then counts on its own; its best stays below the final keep-th best.
    """

    def __init__(self, keep: int, min_similarity: float = -1.0):
        self.keep = keep
        self.min_similarity = min_similarity
        self.best: dict[tuple[str, int], FileHit] = {}

    def add_windows(
        self,
        unit_id: str,
        files: np.ndarray,
        rows: np.ndarray,
        similarity: np.ndarray,
    ) -> None:
        """Windows of one unit: files (B,) non-decreasing, rows (B,), similarity (B,)."""
        if not len(files):
            return
        order = np.lexsort((-similarity, files))  # each file's best window first
        firsts = order[np.r_[True, files[order][1:] != files[order][:-1]]]  # (F,)
        firsts = firsts[similarity[firsts] >= self.min_similarity]
        floor = self.floor()
        for row in firsts[similarity[firsts] >= floor]:
            hit = FileHit(unit_id, int(files[row]), int(rows[row]), float(similarity[row]))
            self.add(hit)

    def add(self, hit: FileHit) -> None:
        known = self.best.get((hit.unit_id, hit.file))
        if known is None or hit.similarity > known.similarity:
            self.best[(hit.unit_id, hit.file)] = hit
        if len(self.best) > PRUNE_FACTOR * self.keep:
            self.best = {(h.unit_id, h.file): h for h in self.top()}

    def floor(self) -> float:
        """A similarity no file below which can make the top `keep` any more."""
        if len(self.best) < self.keep:
            return -np.inf
        similarity = np.fromiter((hit.similarity for hit in self.best.values()), np.float64)
        return float(np.partition(similarity, -self.keep)[-self.keep])

    def top(self) -> list[FileHit]:
        """The `keep` best files, best first (ties: unit, then file order)."""
        ranked = sorted(self.best.values(), key=lambda h: (-h.similarity, h.unit_id, h.file))
        return ranked[: self.keep]


def exact_search(
    output: CommittedOutput,
    query: np.ndarray,
    best: BestFiles,
    unit_paths: Sequence[str] | None = None,
    on_unit: Callable[[int], None] | None = None,
) -> int:
    """Adds the best window of every file of the units (default: all) to `best`; returns the
    windows searched. `query` is (D,) of unit length."""
    query = np.asarray(query, dtype=np.float32)
    searched = 0
    for batch in scan_windows(output, unit_paths, on_unit=on_unit):
        similarity = batch.similarity(query)  # (B,)
        best.add_windows(batch.unit_id, batch.files, batch.rows, similarity)
        searched += len(similarity)
    return searched
