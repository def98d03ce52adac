"""Building the nearest-neighbour index of an output's window embeddings (`ast-label index`),
with FAISS; index_manifest.py says what it holds, index_search.py how it is searched.

A rerun adds segments for the units committed since, and folds the small (Flat) segments into
them; big segments are never rewritten. Segment files are written whole (storage.put_file)
before the manifest that names them, so a killed `index` leaves either the old manifest or the
new one, never one that names a half-written file; the files no manifest names are deleted by
the next `index`. One `index` at a time per output.

Why IVF-SQ8 (benchmarks/bench_search.py, 2 cores): k-means on a sample plus one pass of adds
builds 1M x 768 in under 2 minutes, where HNSW graphs (FAISS, USearch, Voyager) took 3-12x
longer per vector; SQ8 keeps 1 byte per dimension (0.8 GB per million windows) at recall@10 0.99;
a trained segment takes new vectors without retraining, and a segment is a shard: 100M windows
are 50 segments that can be built in parallel and searched one after another.
"""

from __future__ import annotations

import io
import math
import posixpath
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.output.layout import unit_id_of
from pipeline.output.reader import CommittedOutput
from pipeline.search.index_manifest import (
    INDEX_DIR,
    MANIFEST_NAME,
    Manifest,
    Segment,
    index_fits,
    read_manifest,
    unit_sizes,
)
from pipeline.search.windows import scan_windows, search_dim
from pipeline.storage import delete_path, is_temp_name, list_folder, put_file, with_retries

# Segments smaller than this are exact (Flat): k-means needs data, and scanning 50k vectors takes
# a few ms. The next `index` folds them into a new segment.
IVF_MIN_WINDOWS = 50_000
# A segment's most windows (unit files are never split): 2M x 768 SQ8 is 1.6 GB to load.
SEGMENT_MAX_WINDOWS = 2_000_000
# nlist ~ NLIST_PER_SQRT * sqrt(windows), a power of two: 2048 lists for 1M windows.
NLIST_PER_SQRT = 2
# k-means: training points per list and iterations (FAISS defaults: 256 and 25 take 5x longer
# for the same recall here).
TRAIN_POINTS_PER_LIST = 32
KMEANS_ITERATIONS = 10
# Lists probed per query: NPROBE_FRACTION of them, at least MIN_NPROBE (16 of 2048 lists for 1M
# windows: recall@10 0.99 in bench_search.py; 8 loses a little, 32 gains nothing).
NPROBE_FRACTION = 1 / 128
MIN_NPROBE = 16


# --- building --------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexReport:
    units_new: int  # units the index did not cover before
    units_indexed: int  # units read this time: the new ones and those of folded small segments
    windows_added: int
    segments_written: int
    manifest: Manifest
    bytes_written: int
    rebuilt_reason: str | None = None  # why every unit was indexed again, when it was


def update_index(
    output: CommittedOutput,
    rebuild: bool = False,
    note: Callable[[str], None] = lambda line: None,
    progress: Callable[[int], Callable[[int], None]] | None = None,
) -> IndexReport:
    """Indexes the committed units the index does not hold as they are (all with `rebuild`):
    writes their segments, then the manifest (the commit point), then deletes the files no
    manifest names. Segments whose units are all unchanged are kept; when there are new units,
    the small (flat) ones are folded into the new segments. `progress(units)` gives the callback
    that each unit read this time reports to."""
    import faiss

    dim = search_dim(output)
    sizes = unit_sizes(output)
    previous = read_manifest(output)
    old = None if rebuild else previous
    reason = "--rebuild" if rebuild else None
    if old is not None and (misfit := index_fits(old, output, dim)):
        reason, old = misfit, None
    unchanged = _unchanged_segments(old, sizes)
    kept = [segment for segment in unchanged if segment.kind == "ivf"]
    if all(unit_id_of(path) in _units_of(unchanged) for path in output.files):
        kept = unchanged  # nothing new: the small segments stay too
    covered = _units_of(kept)
    todo = [path for path in output.files if unit_id_of(path) not in covered]
    rows = dict(zip(todo, footer_rows(output, todo), strict=True))
    plans = plan_segments(todo, [rows[path] for path in todo])
    on_unit = progress(len(todo)) if progress and todo else None
    new_segments, written = [], 0
    for number, paths in enumerate(plans, start=1):
        if len(plans) > 1:
            note(f"segment {number}/{len(plans)}: {len(paths)} units")
        segment_rows = [rows[path] for path in paths]
        segment, files = _build_segment(output, paths, segment_rows, sizes, dim, on_unit)
        for name, data in files.items():
            put_file(output.location.fs, output.location.path(name), data)
            written += len(data)
        new_segments.append(segment)
    manifest = Manifest(
        dim=dim,
        weights_sha256=str(output.metadata.get("weights_sha256", "")),
        model_fingerprint=str(output.metadata.get("model_fingerprint", "")),
        segments=tuple(kept + new_segments),
        library=f"faiss-cpu {faiss.__version__}",
        model=output.model,
    )
    if old is None or manifest.segments != old.segments:
        put_file(output.location.fs, output.location.path(MANIFEST_NAME), manifest.to_json())
    _delete_unlisted(output, manifest)
    before = previous.unit_bytes() if previous else {}
    new = sum(unit_id_of(path) not in before for path in todo)
    added = sum(segment.windows for segment in new_segments)
    return IndexReport(new, len(todo), added, len(new_segments), manifest, written, reason)


def _unchanged_segments(old: Manifest | None, sizes: dict[str, int]) -> list[Segment]:
    """The segments whose units are all committed and unchanged (`sizes`: unit id -> the unit
    file's size now)."""
    return [
        segment
        for segment in (old.segments if old else ())
        if all(sizes.get(u) == b for u, b in zip(segment.units, segment.unit_bytes, strict=True))
    ]


def _units_of(segments: Sequence[Segment]) -> set[str]:
    return {unit for segment in segments for unit in segment.units}


def footer_rows(output: CommittedOutput, paths: Sequence[str]) -> list[int]:
    """Each unit file's row count, from its Parquet footer."""
    from concurrent.futures import ThreadPoolExecutor

    fragments = {fragment.path: fragment for fragment in output.dataset().get_fragments()}

    def rows(path: str) -> int:
        return output.read_unit_file(lambda: fragments[path].metadata.num_rows, path)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(rows, paths))


def plan_segments(paths: Sequence[str], rows: Sequence[int]) -> list[list[str]]:
    """Units cut into segments of at most SEGMENT_MAX_WINDOWS rows, in order; a unit bigger than
    that is a segment of its own."""
    plans: list[list[str]] = []
    size = 0
    for path, count in zip(paths, rows, strict=True):
        if not plans or size + count > SEGMENT_MAX_WINDOWS:
            plans.append([])
            size = 0
        plans[-1].append(path)
        size += count
    return [plan for plan in plans if plan]


def nlist_for(windows: int) -> int:
    return 2 ** max(4, round(math.log2(NLIST_PER_SQRT * math.sqrt(max(windows, 1)))))


def _build_segment(
    output: CommittedOutput,
    paths: list[str],
    rows: list[int],
    sizes: dict[str, int],
    dim: int,
    on_unit: Callable[[int], None] | None,
) -> tuple[Segment, dict[str, bytes]]:
    """One segment of `paths` (`rows`: each unit file's row count)."""
    import faiss

    windows = sum(rows)
    if windows >= IVF_MIN_WINDOWS:
        nlist = nlist_for(windows)
        index = faiss.index_factory(dim, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        ivf.cp.min_points_per_centroid = 1  # the sample is sized on purpose: no FAISS warning
        index.train(training_sample(output, paths, rows, nlist * TRAIN_POINTS_PER_LIST))
        kind, nprobe = "ivf", max(MIN_NPROBE, int(nlist * NPROBE_FRACTION))
    else:
        index, kind, nprobe = faiss.IndexFlatIP(dim), "flat", 0
    units = [unit_id_of(path) for path in paths]
    unit_number = {unit: number for number, unit in enumerate(units)}
    ids = []
    for batch in scan_windows(output, paths, on_unit=on_unit):
        index.add(batch.vectors)
        ids.append(
            np.stack(
                [np.full(len(batch.rows), unit_number[batch.unit_id]), batch.rows, batch.files],
                axis=1,
            ).astype(np.int32)  # (B, 3)
        )
    table = np.concatenate(ids) if ids else np.zeros((0, 3), np.int32)  # (N, 3)
    segment = Segment(
        name=f"seg-{uuid.uuid4().hex[:12]}",
        kind=kind,
        windows=int(index.ntotal),
        units=tuple(units),
        unit_bytes=tuple(sizes[unit] for unit in units),
        nprobe=nprobe,
    )
    ids_bytes = io.BytesIO()
    np.save(ids_bytes, table)
    serialized = faiss.serialize_index(index)
    del index
    return segment, {
        segment.index_file: serialized.tobytes(),
        segment.ids_file: ids_bytes.getvalue(),
    }


def training_sample(
    output: CommittedOutput, paths: list[str], rows: list[int], points: int
) -> np.ndarray:
    """(<= points, D) vectors of units drawn at random (seeded) until they hold `points` rows,
    then rows drawn from those: k-means sees the whole segment's variety, not its first units."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(paths))
    chosen, total = [], 0
    for position in order:
        chosen.append(paths[position])
        total += rows[position]
        if total >= points * 1.2:  # error rows have no vector
            break
    vectors = np.concatenate(
        [batch.vectors for batch in scan_windows(output, sorted(chosen))] or [np.zeros((0, 1))]
    )
    if len(vectors) > points:
        vectors = vectors[rng.choice(len(vectors), points, replace=False)]
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _delete_unlisted(output: CommittedOutput, manifest: Manifest) -> None:
    """Deletes the segment files the manifest does not name (replaced, or left by a killed run)."""
    fs, folder = output.location.fs, output.location.path(INDEX_DIR)
    listed = {
        posixpath.basename(name)
        for segment in manifest.segments
        for name in (segment.index_file, segment.ids_file)
    }
    names = with_retries(lambda: list_folder(fs, folder), f"cannot list {INDEX_DIR}")
    for name in names:
        base = posixpath.basename(name.rstrip("/"))
        if (base.startswith("seg-") and base not in listed) or is_temp_name(base):
            delete_path(fs, name)
