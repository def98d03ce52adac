"""Searching the nearest-neighbour index: its segments loaded, each asked for its best windows.

A local index is memory-mapped (only the lists a query probes are read from disk); one on an
object store is read whole. Segments are searched one after another and their hits merged: the
fan-out that a sharded index of 100M windows (50 segments of 2M) would do.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from pipeline.output.reader import CommittedOutput
from pipeline.search.index_manifest import Manifest
from pipeline.storage import is_local_filesystem, read_files, with_retries


@dataclass(frozen=True)
class WindowHits:
    """Windows found by the index, best first."""

    similarity: np.ndarray  # (M,) float32
    unit_ids: np.ndarray  # (M,) object: unit id
    rows: np.ndarray  # (M,) int64: row in the unit file
    files: np.ndarray  # (M,) int64: file ordinal in the unit


class LoadedIndex:
    """The index's segments, loaded: local files memory-mapped, remote ones read whole."""

    def __init__(self, output: CommittedOutput, manifest: Manifest):
        import faiss

        self.manifest = manifest
        self.segments = []
        fs, local = output.location.fs, is_local_filesystem(output.location.fs)
        for segment in manifest.segments:
            index_path = output.location.path(segment.index_file)
            what = f"cannot read the index segment {segment.name} of {output.uri}"
            if local:
                index = with_retries(lambda path=index_path: _read_mapped(path), what)
                (ids_blob,) = read_files(fs, [output.location.path(segment.ids_file)], what)
            else:
                blob, ids_blob = read_files(
                    fs, [index_path, output.location.path(segment.ids_file)], what
                )
                index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
                del blob
            if segment.kind == "ivf":
                faiss.extract_index_ivf(index).nprobe = segment.nprobe
            ids = np.load(io.BytesIO(ids_blob))  # (N, 3)
            self.segments.append((segment, index, ids))

    def search(self, vector: np.ndarray, k: int) -> WindowHits:
        """The k best windows of every segment, merged, best first."""
        query = np.ascontiguousarray(vector, dtype=np.float32)[None, :]  # (1, D)
        parts = []
        for segment, index, ids in self.segments:
            if index.ntotal == 0:
                continue
            sims, found = index.search(query, min(k, index.ntotal))  # (1, k) each
            keep = found[0] >= 0
            rows = ids[found[0][keep]]  # (m, 3)
            units = np.asarray(segment.units, dtype=object)[rows[:, 0]]
            parts.append((sims[0][keep], units, rows[:, 1], rows[:, 2]))
        if not parts:
            empty = np.zeros(0, np.int64)
            return WindowHits(np.zeros(0, np.float32), np.zeros(0, object), empty, empty)
        sims, units, rows, files = (np.concatenate(column) for column in zip(*parts, strict=True))
        order = np.argsort(-sims, kind="stable")
        return WindowHits(
            sims[order], units[order], rows[order].astype(np.int64), files[order].astype(np.int64)
        )


def _read_mapped(path: str):
    """A local segment, memory-mapped: only the lists a query probes are read from disk."""
    import faiss

    return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
