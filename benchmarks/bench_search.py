"""Search at scale: `ast-label index`, `similar` and `near-duplicates` on a synthetic output of
768-d embeddings written as real ast-label Parquet, against exact search in the same invocation.

    .venv/bin/python benchmarks/bench_search.py                       # 1,000,000 windows
    .venv/bin/python benchmarks/bench_search.py --windows 50000       # a quick run
    .venv/bin/python benchmarks/bench_search.py --keep /tmp/bench-out  # reuse the output

Each phase runs in a fresh process, so its peak memory (ru_maxrss) is its own:

    exact       one query, streamed over every unit file (pipeline.search.exact): the reference
    truth       the exact 10 nearest windows of every query, one streaming pass: recall's reference
    build       `index` from nothing: time, peak memory, bytes
    query       the index loaded; each query alone: latency (median, p99), recall@10 against truth;
                then `similar` end to end (CLI process) with the index and with --exact
    shards      the same output indexed in --shards segments: per-segment build time and the
                fan-out query latency, the measurable part of 100M windows (50 segments of 2M)
    duplicates  `near-duplicates`: time, memory, planted copies found

The embeddings are what ANN search meets in real ones: low-rank (a 64-d latent through a fixed
768 x 64 map, plus noise), clustered (500 sound classes; files around their class; a file's
windows around the file), files of 1-36 windows, 2% error rows; the queries are held-out windows
of the same distribution. Near-copies (the file plus small noise, another name, another unit)
are planted for near-duplicates.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from labels_output import spec_for, write_unit  # noqa: E402

LATENT = 64
CLASSES = 500
LABELS = 527
PLANTED = 100  # near-copies planted
QUERIES = 200
PARAMS_FILE = "bench-search.json"
GOALS = {"build_s": 300, "build_gib": 6, "query_median_ms": 50, "recall": 0.95, "exact_s": 10}


# --- the synthetic output ------------------------------------------------------------------------


class Embeddings:
    """The generator: a fixed latent map, class centres, and seeded draws per unit."""

    def __init__(self, dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.map = (rng.standard_normal((LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)
        self.offset = (rng.standard_normal(dim) * 0.8).astype(np.float32)
        self.centres = rng.standard_normal((CLASSES, LATENT)).astype(np.float32)

    def windows(self, file_of_row: np.ndarray, files: int, rng: np.random.Generator) -> np.ndarray:
        """(N, D) float32: N windows of `files` files (file_of_row (N,))."""
        file_latent = self.centres[rng.integers(CLASSES, size=files)]
        file_latent = file_latent + 0.6 * rng.standard_normal(file_latent.shape, np.float32)
        latent = file_latent[file_of_row]
        latent += 0.35 * rng.standard_normal(latent.shape, dtype=np.float32)
        vectors = latent @ self.map + self.offset
        vectors += 0.25 * rng.standard_normal(vectors.shape, dtype=np.float32)
        return vectors


def write_output(out: str, windows: int, units: int, dim: int) -> dict:
    """`units` unit files of about windows / units rows each; returns what was planted."""
    generator = Embeddings(dim)
    spec = spec_for(tuple(f"label {i}" for i in range(LABELS)), hidden=dim)
    originals: dict[int, tuple[str, np.ndarray]] = {}
    planted = []
    for unit in range(units):
        rng = np.random.default_rng(1000 + unit)
        counts = np.minimum(rng.geometric(0.3, size=windows // units), 36)  # windows per file
        counts = counts[: np.searchsorted(np.cumsum(counts), windows // units) + 1]
        file_of_row = np.repeat(np.arange(len(counts)), counts)  # (N,)
        vectors = generator.windows(file_of_row, len(counts), rng)  # (N, D)
        keys = [f"clip-{i:06d}" for i in range(len(counts))]
        if unit < units // 2 and len(counts) > 2:  # a file to copy into a later unit
            originals[unit] = (keys[1], vectors[file_of_row == 1])
        source = unit - units // 2
        if source in originals and len(planted) < PLANTED:
            name, copied = originals[source]
            noisy = copied + 0.1 * rng.standard_normal(copied.shape, dtype=np.float32)
            counts = np.r_[counts, len(copied)]
            file_of_row = np.r_[file_of_row, np.full(len(copied), len(keys))]
            vectors = np.concatenate([vectors, noisy])
            keys.append(f"copy-of-{source:06d}-{name}")
            planted.append([f"shard-{source:06d}.tar:{name}", f"shard-{unit:06d}.tar:{keys[-1]}"])
        table = unit_table(spec, unit, keys, counts, file_of_row, vectors, rng)
        write_unit(out, f"shard-{unit:06d}", table)
    # Held-out windows: 200 files the output does not hold, one window each.
    queries = generator.windows(np.arange(QUERIES), QUERIES, np.random.default_rng(7))
    np.save(_meta(out, "queries.npy"), queries)
    return {"planted": planted}


def _meta(out: str, name: str) -> Path:
    return Path(out) / ".ast-label" / name


def unit_table(spec, unit, keys, counts, file_of_row, vectors, rng) -> pa.Table:
    rows = len(file_of_row)
    failed = (rng.random(len(counts)) < 0.02)[file_of_row] & (counts[file_of_row] == 1)  # (N,)
    window_index = np.arange(rows) - np.repeat(np.cumsum(counts) - counts, counts)
    duration = np.repeat(counts * 10.24 - 1.0, counts)
    start = window_index * 10.24
    scores = rng.random((rows, LABELS), dtype=np.float32) * 0.1  # (N, C)
    mask = pa.array(failed)
    columns = [
        pa.array(np.full(rows, f"s3://corpus/shard-{unit:06d}.tar")),
        pa.array(keys).take(pa.array(file_of_row)),
        pa.array(window_index.astype(np.int32)),
        pa.array(start),
        pa.array(np.minimum(start + 10.24, duration)),
        pa.array(duration),
        pa.array(np.full(rows, 16000, np.int32)),
        pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.reshape(-1)), spec.hidden_size, mask=mask
        ),
        pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1)), LABELS, mask=mask),
        pa.nulls(rows, pa.list_(pa.string())),
        pa.nulls(rows, pa.list_(pa.float32())),
        pa.nulls(rows, pa.string()),
        pa.array(np.where(failed, "cannot decode", None)),
    ]
    return pa.Table.from_arrays(columns, schema=spec.schema)


# --- the phases, each in its own process ---------------------------------------------------------


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def phase_exact(out: str, args) -> dict:
    """Exact search for one query, and beside it the floor: the embedding column alone read
    with pyarrow, one unit file after another."""
    import pyarrow.parquet as pq

    from pipeline.output.reader import open_output
    from pipeline.search.exact import BestFiles, exact_search

    started = time.perf_counter()
    for path in sorted(Path(out).glob("*.parquet")):
        for group in pq.ParquetFile(path).iter_batches(columns=["embedding"]):
            del group
    floor_s = time.perf_counter() - started
    query = np.load(_meta(out, "queries.npy"))[0]
    query /= np.linalg.norm(query)
    started = time.perf_counter()
    windows = exact_search(open_output(out), query, BestFiles(20))
    seconds = time.perf_counter() - started
    return {"exact_s": seconds, "floor_s": floor_s, "windows": windows, "gib": peak_gib()}


def phase_truth(out: str, args) -> dict:
    """The exact top-10 windows of every query (one pass, all queries at once)."""
    from pipeline.output.reader import open_output
    from pipeline.search.windows import scan_windows

    queries = np.load(_meta(out, "queries.npy"))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)  # (Q, D)
    best = np.full((len(queries), 10), -np.inf, np.float32)
    ids = np.zeros((len(queries), 10), np.int64)
    started = time.perf_counter()
    for batch in scan_windows(open_output(out)):
        sims = queries @ batch.vectors.T  # (Q, B)
        unit = int(batch.unit_id.rsplit("-", 1)[1])
        found = np.broadcast_to(unit * 2**32 + batch.rows, sims.shape)
        both_s, both_i = np.concatenate([best, sims], 1), np.concatenate([ids, found], 1)
        top = np.argsort(-both_s, axis=1)[:, :10]
        best, ids = np.take_along_axis(both_s, top, 1), np.take_along_axis(both_i, top, 1)
    np.save(_meta(out, "truth.npy"), ids)
    return {"truth_s": time.perf_counter() - started}


def phase_build(out: str, args) -> dict:
    from pipeline.output.reader import open_output
    from pipeline.search import neighbour_index

    if args.segment_windows:
        neighbour_index.SEGMENT_MAX_WINDOWS = args.segment_windows
    started = time.perf_counter()
    report = neighbour_index.update_index(open_output(out), rebuild=True)
    return {
        "build_s": time.perf_counter() - started,
        "gib": peak_gib(),
        "index_mib": report.bytes_written / 2**20,
        "segments": len(report.manifest.segments),
        "windows": report.manifest.windows,
    }


def phase_query(out: str, args) -> dict:
    import faiss

    from pipeline.output.reader import open_output
    from pipeline.search.index_manifest import read_manifest
    from pipeline.search.index_search import LoadedIndex

    output = open_output(out)
    faiss.omp_set_num_threads(1)  # one query at a time, as `similar` asks
    started = time.perf_counter()
    index = LoadedIndex(output, read_manifest(output))
    load_s = time.perf_counter() - started
    queries = np.load(_meta(out, "queries.npy"))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.load(_meta(out, "truth.npy"))
    figures = {"load_s": load_s, "gib": peak_gib()}
    for nprobe in args.nprobes:
        for segment, loaded, _ in index.segments:
            if segment.kind == "ivf":
                faiss.extract_index_ivf(loaded).nprobe = nprobe or segment.nprobe
        times, recalls = [], []
        for query, expected in zip(queries, truth, strict=True):
            t = time.perf_counter()
            hits = index.search(query, 10)
            times.append(time.perf_counter() - t)
            units = np.array([int(u.rsplit("-", 1)[1]) for u in hits.unit_ids[:10]])
            recalls.append(len(set(units * 2**32 + hits.rows[:10]) & set(expected)) / 10)
        name = f"nprobe {nprobe}" if nprobe else "default nprobe"
        figures[name] = {
            "median_ms": float(np.median(times) * 1000),
            "p99_ms": float(np.percentile(times, 99) * 1000),
            "recall": float(np.mean(recalls)),
        }
    return figures


def phase_duplicates(out: str, args) -> dict:
    from pipeline.search.duplicates import find_near_duplicates

    planted = {tuple(pair) for pair in json.loads(_meta(out, PARAMS_FILE).read_text())["planted"]}
    started = time.perf_counter()
    report = find_near_duplicates(out)
    seconds = time.perf_counter() - started
    grouped = {
        f"{g.files[i].shard.rsplit('/', 1)[1]}:{g.files[i].key}": g.number
        for g in report.groups
        for i in range(len(g.files))
    }
    found = sum(1 for a, b in planted if a in grouped and grouped.get(a) == grouped.get(b))
    return {
        "duplicates_s": seconds,
        "gib": peak_gib(),
        "files": report.files,
        "planted": len(planted),
        "found": found,
        "groups": len(report.groups),
    }


PHASES = {
    "exact": phase_exact,
    "truth": phase_truth,
    "build": phase_build,
    "query": phase_query,
    "duplicates": phase_duplicates,
}


def run_phase(name: str, out: str, *extra: str) -> dict:
    command = [sys.executable, __file__, "--phase", name, "--output", out, *extra]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cli_seconds(*args: str) -> float:
    started = time.perf_counter()
    command = [str(Path(sys.executable).with_name("ast-label")), *args]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def shard_copy(out: str, folder: Path) -> str:
    """The same output under another folder (links to its unit files), for another index."""
    copy = folder / "out-shards"
    shutil.rmtree(copy, ignore_errors=True)
    (copy / ".ast-label").mkdir(parents=True)
    for path in Path(out).glob("*.parquet"):
        (copy / path.name).symlink_to(path)
    (copy / ".ast-label" / "commits").symlink_to(Path(out) / ".ast-label" / "commits")
    for name in ("queries.npy", "truth.npy"):
        shutil.copy(_meta(out, name), copy / ".ast-label" / name)
    return str(copy)


def prepare(args, folder: Path) -> str:
    out = str(folder / "out")
    params = {"windows": args.windows, "units": args.units, "dim": args.dim}
    known = _meta(out, PARAMS_FILE)
    if known.exists() and {k: json.loads(known.read_text()).get(k) for k in params} == params:
        print(f"reusing {out}")
        return out
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    planted = write_output(out, args.windows, args.units, args.dim)
    known.write_text(json.dumps({**params, **planted}))
    size = sum(p.stat().st_size for p in Path(out).glob("*.parquet")) / 2**30
    seconds = time.perf_counter() - started
    print(f"wrote {out}: {args.units} unit files, {size:.1f} GiB, {seconds:.0f} s")
    return out


def report(figures: dict, args) -> None:
    exact, build, query, cli = figures["exact"], figures["build"], figures["query"], figures["cli"]
    chosen = query["default nprobe"]
    print(
        f"\n{args.windows:,} windows x {args.dim}-d, {args.units} unit files, {QUERIES} queries, "
        f"{os.cpu_count()} CPUs; goals in brackets"
    )
    lines = [
        f"exact search, 1 query (the reference): {exact['exact_s']:.1f} s, {exact['gib']:.2f} GiB "
        f"[{GOALS['exact_s']} s, 2 GiB]; {exact['exact_s'] / exact['floor_s']:.2f}x reading the "
        f"embedding column alone ({exact['floor_s']:.1f} s)",
        f"index build: {build['build_s']:.0f} s, {build['gib']:.2f} GiB "
        f"[{GOALS['build_s']} s, {GOALS['build_gib']} GiB]; {build['index_mib']:.0f} MiB; "
        f"{build['build_s'] / exact['exact_s']:.0f}x one exact search",
        f"index load: {query['load_s']:.2f} s",
        f"query, index loaded: median {chosen['median_ms']:.2f} ms, p99 {chosen['p99_ms']:.2f} ms "
        f"[{GOALS['query_median_ms']} ms]; {exact['exact_s'] * 1000 / chosen['median_ms']:,.0f}x "
        "faster than exact search",
        f"recall@10 against exact search: {chosen['recall']:.3f} [{GOALS['recall']}]",
        *(
            f"  with {name}: median {v['median_ms']:.2f} ms, recall@10 {v['recall']:.3f}"
            for name, v in query.items()
            if name.startswith("nprobe")
        ),
        f"`ast-label similar --key` (a whole process): {cli['index_s']:.1f} s with the index, "
        f"{cli['exact_s']:.1f} s with --exact ({cli['exact_s'] / cli['index_s']:.1f}x)",
    ]
    if "duplicates" in figures:
        d = figures["duplicates"]
        lines.append(
            f"near-duplicates: {d['duplicates_s']:.0f} s, {d['gib']:.2f} GiB, {d['files']:,} "
            f"files; {d['found']}/{d['planted']} planted copies found, {d['groups']} groups"
        )
    if "shards" in figures:
        s, q = figures["shards"]["build"], figures["shards"]["query"]["default nprobe"]
        lines.append(
            f"as {s['segments']} segments: build {s['build_s']:.0f} s ({s['gib']:.2f} GiB); query "
            f"median {q['median_ms']:.2f} ms ({q['median_ms'] / chosen['median_ms']:.1f}x one "
            f"segment), recall@10 {q['recall']:.3f}"
        )
    print("\n".join(f"  {line}" for line in lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--units", type=int, help="Unit files [default: one per 10,000 windows].")
    parser.add_argument(
        "--shards", type=int, default=8, help="Segments for the fan-out run (0: skip)."
    )
    parser.add_argument("--keep", type=Path, help="Folder for the output, kept and reused.")
    parser.add_argument("--no-duplicates", action="store_true")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--segment-windows", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--nprobes", type=int, nargs="*", default=[0, 8, 32], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args.output, args)))
        return
    args.units = args.units or max(2, args.windows // 10_000)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-search-"))
    folder.mkdir(parents=True, exist_ok=True)
    out = prepare(args, folder)
    figures = {}
    for name in ("exact", "truth", "build", "query"):
        figures[name] = run_phase(name, out)
        print(name, json.dumps(figures[name]), flush=True)
    key = json.loads(_meta(out, PARAMS_FILE).read_text())["planted"][0][0]
    figures["cli"] = {
        "index_s": cli_seconds("similar", out, "--key", key),
        "exact_s": cli_seconds("similar", out, "--key", key, "--exact"),
    }
    if not args.no_duplicates:
        figures["duplicates"] = run_phase("duplicates", out)
        print("duplicates", json.dumps(figures["duplicates"]), flush=True)
    if args.shards:
        copy = shard_copy(out, folder)
        per = str(max(1, round(args.windows / args.shards * 1.05)))  # units overshoot a little
        figures["shards"] = {
            "build": run_phase("build", copy, "--segment-windows", per),
            "query": run_phase("query", copy, "--nprobes", "0"),
        }
        print("shards", json.dumps(figures["shards"]), flush=True)
    report(figures, args)
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
