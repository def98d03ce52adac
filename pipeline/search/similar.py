"""`ast-label similar`: the files of an output that sound most like a query window.

    query (query.py)                                  one window's unit-length embedding (D,)
      -> the index (index_search.py), when there is one that fits the output: the best
         windows of the units it covers, grouped by file
      -> exact search (exact.py) over every committed unit the index does not cover: units
         committed after the index was built are never missed
      -> the k best files (a file's similarity: its best window's cosine)
      -> each file's windows read back from its unit file: every window's similarity (where in
         the file the match lies), its time span, its top labels (and head labels)

Without an index, or with --exact, every window is searched exactly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.defaults import SIMILAR_K
from pipeline.errors import UserError
from pipeline.output.layout import unit_id_of
from pipeline.output.reader import CommittedOutput, list_matrix, open_output
from pipeline.search.exact import BestFiles, FileHit, exact_search
from pipeline.search.index_manifest import index_fits, read_manifest, unit_sizes
from pipeline.search.index_search import LoadedIndex
from pipeline.search.query import Query, QueryRequest, make_query
from pipeline.search.windows import search_dim, unit_lengths

# Windows asked of the index per file wanted, at first; then 4x more until k files are found.
WINDOWS_PER_FILE = 4
MAX_INDEX_WINDOWS = 65_536
# A file's matching windows: those within this much of its best window (or above
# --min-similarity), merged into spans.
MATCH_MARGIN = 0.05
DESCRIBE_COLUMNS = ("shard", "key", "window_index", "start_s", "end_s", "duration_s", "error")


@dataclass(frozen=True)
class Match:
    """One file of the result."""

    rank: int
    similarity: float  # its best window's cosine similarity to the query
    shard: str
    key: str
    duration_s: float
    best: int  # position of the best window in the arrays below
    window_index: np.ndarray  # (W,) its labeled windows
    start_s: np.ndarray  # (W,)
    end_s: np.ndarray  # (W,)
    similarities: np.ndarray  # (W,) each window's cosine similarity to the query
    top_labels: dict[str, float]  # the best window's
    head_labels: tuple[str, ...] | None = None  # the best window's, where the output has a head

    def matching(self, min_similarity: float | None) -> np.ndarray:
        """(W,) the windows that match: within MATCH_MARGIN of the best, or above the floor."""
        floor = self.similarity - MATCH_MARGIN
        if min_similarity is not None:
            floor = max(floor, min_similarity)
        return self.similarities >= floor


@dataclass
class SimilarResult:
    output: CommittedOutput
    query: Query
    matches: list[Match]
    k: int
    min_similarity: float | None
    searched: dict[str, int] = field(default_factory=dict)  # windows and units, by how
    notes: list[str] = field(default_factory=list)


def find_similar(
    output_uri: str,
    request: QueryRequest,
    k: int = SIMILAR_K,
    min_similarity: float | None = None,
    exact: bool = False,
    progress: Callable[[str, int], Callable[[int], None] | None] = lambda what, units: None,
) -> SimilarResult:
    """The k files of the output most similar to the query. `progress(what, units)` may return
    a per-unit callback for the long passes."""
    if k < 1:
        raise UserError(f"--k {k} must be at least 1")
    if min_similarity is not None and not -1.0 <= min_similarity <= 1.0:
        raise UserError(f"--min-similarity {min_similarity} is not a cosine: give -1 to 1")
    output = open_output(output_uri)
    query = make_query(output, request)
    keep = k + (query.own_file is not None)  # the query's own file is found, then left out
    best = BestFiles(keep, -1.0 if min_similarity is None else min_similarity)
    result = SimilarResult(output, query, [], k, min_similarity)
    todo = list(output.files)
    if not exact:
        todo = _search_index(output, query, best, result)
    if todo:
        on_unit = progress("exact search", len(todo))
        windows = exact_search(output, query.vector, best, todo, on_unit)
        result.searched.update(exact_windows=windows, exact_units=len(todo))
    matches = [
        match
        for match in describe(output, best.top(), query)
        if (match.shard, match.key) != query.own_file
        and (min_similarity is None or match.similarity >= min_similarity)
    ]
    result.matches = [replace(m, rank=rank) for rank, m in enumerate(matches[:k], start=1)]
    return result


def _search_index(
    output: CommittedOutput, query: Query, best: BestFiles, result: SimilarResult
) -> list[str]:
    """Adds the index's best files to `best`; returns the committed unit files it does not hold
    as they are now (all of them without a usable index): those are searched exactly."""
    manifest = read_manifest(output)
    if manifest is None:
        return list(output.files)
    misfit = index_fits(manifest, output, search_dim(output))
    if misfit:
        result.notes.append(f"the index is not used: {misfit}; run `ast-label index --rebuild`")
        return list(output.files)
    covered = manifest.covered(unit_sizes(output))
    if covered:
        _best_indexed_files(LoadedIndex(output, manifest), query, covered, best)
        windows = sum(s.windows for s in manifest.segments if set(s.units) <= covered)
        result.searched.update(index_windows=windows, index_units=len(covered))
    return [path for path in output.files if unit_id_of(path) not in covered]


def _best_indexed_files(
    index: LoadedIndex, query: Query, covered: set[str], best: BestFiles
) -> None:
    """The index's best windows grouped by file, asking for more windows until `best.keep`
    files are found (or every window is below --min-similarity, or there are no more)."""
    asked = WINDOWS_PER_FILE * best.keep
    total = index.manifest.windows
    while True:
        hits = index.search(query.vector, asked)
        found = BestFiles(best.keep, best.min_similarity)
        for i in np.flatnonzero([unit in covered for unit in hits.unit_ids]):
            similarity = float(hits.similarity[i])
            found.add(
                FileHit(str(hits.unit_ids[i]), int(hits.files[i]), int(hits.rows[i]), similarity)
            )
        exhausted = len(hits.similarity) < min(asked, total)
        below = len(hits.similarity) > 0 and hits.similarity[-1] < best.min_similarity
        if (
            len(found.best) >= best.keep
            or exhausted
            or below
            or asked >= min(MAX_INDEX_WINDOWS, total)
        ):
            break
        asked *= 4
    for hit in found.best.values():
        best.add(hit)


def describe(output: CommittedOutput, hits: list[FileHit], query: Query) -> list[Match]:
    """The hits' files read back from their unit files: every window, its similarity and labels.
    Ranked by similarity (ties: the order of `hits`)."""
    by_unit: dict[str, list[FileHit]] = defaultdict(list)
    for hit in hits:
        by_unit[hit.unit_id].append(hit)
    fragments = {unit_id_of(f.path): f for f in output.dataset().get_fragments()}
    matches = []
    for unit_id, unit_hits in by_unit.items():
        matches += _describe_unit(output, fragments[unit_id], unit_hits, query)
    order = {(hit.unit_id, hit.file): position for position, hit in enumerate(hits)}
    matches.sort(key=lambda item: (-item[0].similarity, order[item[1]]))
    return [match for match, _ in matches]


def _describe_unit(
    output: CommittedOutput, fragment: pads.ParquetFileFragment, hits: list[FileHit], query: Query
) -> list[tuple[Match, tuple[str, int]]]:
    path = fragment.path
    keys = output.read_unit_file(lambda: fragment.to_table(columns=["key"]), path)["key"]
    wanted = {keys[hit.row].as_py(): hit for hit in hits}
    head = "head_labels" in (output.schema.names if output.schema is not None else [])
    columns = [*DESCRIBE_COLUMNS, "top_labels", "top_scores", "embedding"]
    columns += ["head_labels"] if head else []
    table = output.read_unit_file(
        lambda: fragment.to_table(columns=columns, filter=pc.field("key").isin(list(wanted))),
        path,
    )
    dim = search_dim(output)
    matches = []
    for key, hit in wanted.items():
        rows = table.filter(pc.equal(table["key"], key))
        rows = rows.take(pc.sort_indices(rows, [("window_index", "ascending")]))
        rows = rows.filter(pc.and_(pc.is_null(rows["error"]), pc.is_valid(rows["embedding"])))
        usable, vectors = unit_lengths(list_matrix(rows["embedding"], dim))  # (W, D)
        rows = rows.take(pa.array(usable))
        similarities = vectors @ query.vector  # (W,)
        best = int(np.argmax(similarities))
        match = Match(
            rank=0,
            similarity=float(similarities[best]),
            shard=rows["shard"][0].as_py(),
            key=key,
            duration_s=float(rows["duration_s"][0].as_py()),
            best=best,
            window_index=np.asarray(rows["window_index"], dtype=np.int64),
            start_s=np.asarray(rows["start_s"], dtype=np.float64),
            end_s=np.asarray(rows["end_s"], dtype=np.float64),
            similarities=similarities,
            top_labels=_labels(rows, best),
            head_labels=tuple(rows["head_labels"][best].as_py() or ()) if head else None,
        )
        matches.append((match, (hit.unit_id, hit.file)))
    return matches


def _labels(rows: pa.Table, position: int) -> dict[str, float]:
    names = rows["top_labels"][position].as_py() or []
    scores = rows["top_scores"][position].as_py() or []
    return {name: round(float(score), 4) for name, score in zip(names, scores, strict=False)}
