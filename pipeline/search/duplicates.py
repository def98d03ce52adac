"""`ast-label near-duplicates`: groups of files that are the same recording (another codec, gain,
container or name).

File similarity, defined: two files of durations within DURATION_TOLERANCE_S of each other have
windows that start at the same times; their similarity is the LOWEST cosine over those aligned
windows (window i of one against window i of the other, for every i both have). Files are near-
duplicates when it reaches the threshold: every part of one sounds like the same part of the
other. A clip and a longer recording that contains it are not (`similar` finds those).

Since every aligned pair must reach the threshold, the first windows must: that is how
candidates are found, without comparing all pairs of files:

    pass 1  every unit file, streamed: per file its window count, duration, and its first
            window's embedding (float16: F x D x 2 bytes in memory)
    pass 2  pairs of first windows with cosine >= threshold - CANDIDATE_MARGIN (exact blocks for
            small outputs; for big ones, all pairs within FAISS k-means cells, each file in its
            two nearest cells) and durations that agree
    pass 3  the candidates' windows read again in float32: the pairs whose every aligned window
            reaches the threshold; groups = connected pairs (union-find)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from pipeline.defaults import DUPLICATE_MIN_SIMILARITY
from pipeline.errors import UserError
from pipeline.output.layout import unit_id_of
from pipeline.output.reader import CommittedOutput, open_output
from pipeline.search.windows import scan_windows, search_dim

DURATION_TOLERANCE_S = 0.5
DUPLICATE_DEFINITION = (
    "the lowest cosine over aligned windows (window i against window i) of two files whose "
    f"durations differ by at most {DURATION_TOLERANCE_S:g} s"
)
# First windows are compared in float16: candidates may be this much below the threshold; pass 3
# decides in float32.
CANDIDATE_MARGIN = 0.01
# Up to this many files, candidates come from exact blocks of first-window products.
EXACT_UNDER_FILES = 50_000
BLOCK_ROWS = 1024
# Big outputs: k-means cells per sqrt(files), and the cells each file joins.
CELLS_PER_SQRT = 2
CELLS_PER_FILE = 2


@dataclass(frozen=True)
class DuplicateFile:
    shard: str
    key: str
    windows: int
    duration_s: float
    similarity: float  # its highest file similarity to another file of the group


@dataclass(frozen=True)
class DuplicateGroup:
    number: int
    files: tuple[DuplicateFile, ...]  # in (shard, key) order: the first is the one to keep


@dataclass
class DuplicateReport:
    output: CommittedOutput
    min_similarity: float
    files: int  # files with embeddings, all compared
    candidate_pairs: int
    groups: list[DuplicateGroup]

    @property
    def duplicates(self) -> int:
        """Files to drop: all but the first of each group."""
        return sum(len(group.files) - 1 for group in self.groups)


@dataclass
class _Files:
    """One row per file with embeddings (F,): where it is, and its first window (F, D) fp16."""

    units: np.ndarray  # (F,) object: unit id
    ordinals: np.ndarray  # (F,) file ordinal in the unit
    windows: np.ndarray  # (F,) labeled windows
    duration_s: np.ndarray  # (F,)
    first: np.ndarray  # (F, D) float16, unit length


def find_near_duplicates(
    output_uri: str,
    min_similarity: float = DUPLICATE_MIN_SIMILARITY,
    progress: Callable[[str, int], Callable[[int], None] | None] = lambda what, units: None,
) -> DuplicateReport:
    if not 0.0 < min_similarity <= 1.0:
        raise UserError(f"--min-similarity {min_similarity} must be above 0 and at most 1")
    output = open_output(output_uri)
    files = _scan_files(output, progress("near-duplicates", len(output.files)))
    pairs = candidate_pairs(files, min_similarity - CANDIDATE_MARGIN)
    similarity = verify_pairs(output, files, pairs)  # (P,)
    kept = similarity >= min_similarity
    groups = _groups(output, files, pairs[kept], similarity[kept])
    return DuplicateReport(output, min_similarity, len(files.units), len(pairs), groups)


def _scan_files(output: CommittedOutput, on_unit: Callable[[int], None] | None) -> _Files:
    dim = search_dim(output)
    units, ordinals, counts, durations, first_keys, firsts = [], [], [], [], [], []
    for batch in scan_windows(output, None, ("window_index", "duration_s"), on_unit):
        if not len(batch.files):
            continue
        starts = np.flatnonzero(np.r_[True, batch.files[1:] != batch.files[:-1]])  # (f,)
        units.append(np.full(len(starts), batch.unit_id, dtype=object))
        ordinals.append(batch.files[starts])
        counts.append(np.diff(np.r_[starts, len(batch.files)]))
        durations.append(np.asarray(batch.columns["duration_s"], np.float64)[starts])
        is_first = np.asarray(batch.columns["window_index"]) == 0
        first_keys += [(batch.unit_id, int(f)) for f in batch.files[is_first]]
        firsts.append((batch.raw[is_first] / batch.norms[is_first, None]).astype(np.float16))
    if not units:
        empty = np.zeros(0, np.int64)
        return _Files(
            np.zeros(0, object), empty, empty, np.zeros(0), np.zeros((0, dim), np.float16)
        )
    # A file's windows may straddle two row groups: its parts are summed.
    keys = list(zip(np.concatenate(units).tolist(), np.concatenate(ordinals).tolist(), strict=True))
    position: dict[tuple[str, int], int] = {}
    for key in keys:
        position.setdefault(key, len(position))
    where = np.fromiter((position[key] for key in keys), np.int64, len(keys))
    windows = np.bincount(where, weights=np.concatenate(counts)).astype(np.int64)
    duration = np.zeros(len(position))
    duration[where] = np.concatenate(durations)
    first = np.zeros((len(position), dim), np.float16)
    has_first = np.zeros(len(position), bool)
    first_rows = np.fromiter((position[key] for key in first_keys), np.int64, len(first_keys))
    first[first_rows] = np.concatenate(firsts) if firsts else first[:0]
    has_first[first_rows] = True
    ids = list(position)
    keep = np.flatnonzero(has_first)  # a file whose window 0 failed has nothing to align
    return _Files(
        units=np.array([ids[i][0] for i in keep], dtype=object),
        ordinals=np.array([ids[i][1] for i in keep], dtype=np.int64),
        windows=windows[keep],
        duration_s=duration[keep],
        first=first[keep],
    )


def candidate_pairs(files: _Files, radius: float) -> np.ndarray:
    """(P, 2) file pairs i < j whose first windows reach `radius` and durations agree."""
    count = len(files.units)
    if count < 2:
        return np.zeros((0, 2), np.int64)
    if count <= EXACT_UNDER_FILES:
        pairs = _exact_pairs(files.first, radius)
    else:
        pairs = _cell_pairs(files.first, radius)
    agree = np.abs(files.duration_s[pairs[:, 0]] - files.duration_s[pairs[:, 1]])
    return pairs[agree <= DURATION_TOLERANCE_S]


def _exact_pairs(first: np.ndarray, radius: float) -> np.ndarray:
    vectors = first.astype(np.float32)  # (F, D)
    found = []
    for start in range(0, len(vectors), BLOCK_ROWS):
        block = vectors[start : start + BLOCK_ROWS] @ vectors.T  # (b, F)
        rows, cols = np.nonzero(block >= radius)
        rows += start
        found.append(np.stack([rows, cols], axis=1)[rows < cols])
    return np.concatenate(found).astype(np.int64)


def _cell_pairs(first: np.ndarray, radius: float) -> np.ndarray:
    """Pairs within cells: k-means cells of the first windows, each file in its CELLS_PER_FILE
    nearest cells, every pair of a cell compared with one matrix product. Two first windows
    this alike sit in a common cell unless both lie on a border of 2+ cells (the benchmark's
    planted copies: all found)."""
    import faiss

    count, dim = first.shape
    cells = 2 ** max(4, round(math.log2(CELLS_PER_SQRT * math.sqrt(count))))
    sample = np.random.default_rng(0).choice(count, min(count, cells * 32), replace=False)
    kmeans = faiss.Kmeans(dim, cells, niter=10, seed=0, spherical=True, min_points_per_centroid=1)
    kmeans.train(first[np.sort(sample)].astype(np.float32))
    nearest = np.concatenate(
        [
            kmeans.index.search(first[s : s + BLOCK_ROWS].astype(np.float32), CELLS_PER_FILE)[1]
            for s in range(0, count, BLOCK_ROWS)
        ]
    )  # (F, CELLS_PER_FILE)
    cell_of = nearest.reshape(-1)
    file_of = np.repeat(np.arange(count), CELLS_PER_FILE)
    order = np.argsort(cell_of, kind="stable")
    bounds = np.flatnonzero(np.diff(cell_of[order])) + 1
    found = []
    for members in np.split(file_of[order], bounds):
        found.append(members[_exact_pairs(first[members], radius)])  # blocks: a cell may be big
    pairs = np.sort(np.concatenate(found), axis=1)  # (P, 2), i < j
    return np.unique(pairs, axis=0).astype(np.int64)


def verify_pairs(output: CommittedOutput, files: _Files, pairs: np.ndarray) -> np.ndarray:
    """(P,) each pair's file similarity (the lowest cosine over aligned windows), in float32 from
    the unit files; -inf for pairs with no aligned window."""
    if not len(pairs):
        return np.zeros(0)
    wanted = np.unique(pairs.reshape(-1))
    by_unit: dict[str, set[int]] = defaultdict(set)
    for i in wanted:
        by_unit[files.units[i]].add(int(files.ordinals[i]))
    paths = [path for path in output.files if unit_id_of(path) in by_unit]
    vectors: dict[tuple[str, int], dict[int, np.ndarray]] = defaultdict(dict)
    for batch in scan_windows(output, paths, ("window_index",)):
        wanted_here = np.flatnonzero(np.isin(batch.files, list(by_unit[batch.unit_id])))
        unit_vectors = batch.raw[wanted_here] / batch.norms[wanted_here, None]  # (w, D)
        for row, vector in zip(wanted_here, unit_vectors, strict=True):
            window = int(batch.columns["window_index"][row])
            vectors[(batch.unit_id, int(batch.files[row]))][window] = vector
    similarity = np.full(len(pairs), -np.inf)
    for number, (a, b) in enumerate(pairs):
        left = vectors[(files.units[a], int(files.ordinals[a]))]
        right = vectors[(files.units[b], int(files.ordinals[b]))]
        aligned = sorted(set(left) & set(right))
        if aligned:
            similarity[number] = min(float(left[w] @ right[w]) for w in aligned)
    return similarity


def _groups(
    output: CommittedOutput, files: _Files, pairs: np.ndarray, similarity: np.ndarray
) -> list[DuplicateGroup]:
    parent = list(range(len(files.units)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    best = defaultdict(lambda: -np.inf)
    for (a, b), value in zip(pairs.tolist(), similarity.tolist(), strict=True):
        parent[root(a)] = root(b)
        best[a], best[b] = max(best[a], value), max(best[b], value)
    members = defaultdict(list)
    for i in best:
        members[root(i)].append(i)
    names = _file_names(output, files, sorted(best))
    groups = [
        sorted(
            (
                DuplicateFile(*names[i], int(files.windows[i]), float(files.duration_s[i]), best[i])
                for i in group
            ),
            key=lambda f: (f.shard, f.key),
        )
        for group in members.values()
    ]
    groups.sort(key=lambda g: (-len(g), g[0].shard, g[0].key))
    return [DuplicateGroup(n, tuple(g)) for n, g in enumerate(groups, start=1)]


def _file_names(output: CommittedOutput, files: _Files, indices: list[int]) -> dict:
    """file index -> (shard, key), read from the units of those files."""
    by_unit: dict[str, dict[int, int]] = defaultdict(dict)
    for i in indices:
        by_unit[files.units[i]][int(files.ordinals[i])] = i
    fragments = {unit_id_of(f.path): f for f in output.dataset().get_fragments()}
    names = {}
    for unit, ordinals in by_unit.items():
        fragment = fragments[unit]
        table = output.read_unit_file(
            lambda f=fragment: f.to_table(columns=["shard", "key"]), fragment.path
        )
        keys = table["key"].combine_chunks()
        changes = np.r_[True, ~np.asarray(pc.equal(keys[1:], keys[:-1]).fill_null(False))]
        firsts = np.flatnonzero(changes) if len(keys) else np.zeros(0, np.int64)
        for ordinal, i in ordinals.items():
            row = int(firsts[ordinal])
            names[i] = (table["shard"][row].as_py(), keys[row].as_py())
    return names
