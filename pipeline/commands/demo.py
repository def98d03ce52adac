"""`ast-label demo`: a synthetic WebDataset corpus, labelled by the real pipeline, then summarised.

It needs nothing but this package: the corpus comes from synthetic.py, the model is the
bundled default (ast_model/default, trained on the same kinds of sound), and Ray runs on this
machine (a Ray of its own: RAY_ADDRESS is not read, so a demo never lands on a cluster).
The corpus has what real corpora have: several shards, long files (several windows), stereo
44.1 kHz and 22.05 kHz files, WAV and FLAC at 16 and 24 bit, a .json metadata member per sample,
and two broken files that must come out as error rows.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from ast_model.config import DEFAULT_MODEL
from pipeline.commands.demo_head import (
    NOVEL_SHARD,
    recipe,
    write_head_examples,
    write_novel_shard,
)
from pipeline.commands.synthetic import CLASS_NAMES, MAX_DURATION_S, MIN_DURATION_S, generate_clip
from pipeline.output.layout import METADATA_KEY

if TYPE_CHECKING:  # labeling.run pulls in Ray Data; writing a corpus or a report does not need it
    from pipeline.labeling.summary import RunSummary

NUM_SHARDS = 4
CLIPS_PER_SHARD = 50
LONG_CLIP_FRACTION = 0.1
LONG_DURATION_S = (25.0, 40.0)  # three or four 10.24 s windows
# (sample rate, channels, share of clips): most corpora are mostly 16 kHz mono, with some CD-rate
# stereo and odd rates mixed in; the pipeline resamples and downmixes them all.
SOURCE_FORMATS = ((16000, 1, 0.6), (44100, 2, 0.25), (22050, 1, 0.15))
# (container, soundfile subtype). No float WAV: libsndfile stamps its PEAK chunk with the time,
# and the corpus must be byte-for-byte reproducible.
ENCODINGS = (("wav", "PCM_16"), ("wav", "PCM_24"), ("flac", "PCM_16"), ("flac", "PCM_24"))
# A fixed mtime keeps tar bytes reproducible.
TAR_MTIME = 1_700_000_000
MAX_MISSES_SHOWN = 10


@dataclass(frozen=True)
class DemoCorpus:
    directory: Path
    shards: tuple[Path, ...]
    truth: dict[tuple[str, str], str]  # (shard file name, key) -> the generator's label
    broken: dict[tuple[str, str], str]  # (shard file name, key) -> what is wrong with the file
    # (shard file name, key) -> a class the bundled model never saw (demo_head.py)
    novel: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def num_files(self) -> int:
        return len(self.truth) + len(self.broken) + len(self.novel)


@dataclass(frozen=True)
class FileResult:
    """One input file's outcome: its label over all its windows, or the error it became."""

    shard: str  # shard file name
    key: str
    windows: int
    predicted: str | None  # argmax of the mean of the windows' scores
    score: float | None
    error: str | None


@dataclass(frozen=True)
class DemoReport:
    corpus: DemoCorpus
    summary: RunSummary
    labels_dir: Path
    files: tuple[FileResult, ...]
    # (result, true label) for every generated file not labelled as generated; a file with no rows
    # at all (a loss) appears with windows=0.
    misses: tuple[tuple[FileResult, str], ...] = field(default=())

    @property
    def correct(self) -> int:
        return len(self.corpus.truth) - len(self.misses)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, len(self.corpus.truth))


def _encode(waveform: np.ndarray, sample_rate: int, container: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, waveform, sample_rate, format=container.upper(), subtype=subtype)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _broken_samples(rng: np.random.Generator) -> list[tuple[str, str, bytes, str]]:
    """(key, extension, bytes, reason): a FLAC cut off mid-stream, and text named .wav."""
    clip = generate_clip("Sine wave", rng, 16000, duration_s=5.0)
    flac = _encode(clip, 16000, "flac", "PCM_16")
    return [
        (
            "broken-truncated",
            "flac",
            flac[: len(flac) // 2],
            "FLAC cut off half-way (a failed download)",
        ),
        (
            "broken-not-audio",
            "wav",
            b"These are meeting notes, not audio.\n" * 20,
            "a text file named .wav",
        ),
    ]


def _sample(label: str, rng: np.random.Generator) -> tuple[str, bytes, dict]:
    """One clip of `label` in a random source format: (extension, encoded bytes, its metadata)."""
    shares = np.array([share for _, _, share in SOURCE_FORMATS])
    sample_rate, channels, _ = SOURCE_FORMATS[
        rng.choice(len(SOURCE_FORMATS), p=shares / shares.sum())
    ]
    container, subtype = ENCODINGS[rng.integers(len(ENCODINGS))]
    if rng.random() < LONG_CLIP_FRACTION:
        duration_s = float(rng.uniform(*LONG_DURATION_S))
    else:
        duration_s = float(rng.uniform(MIN_DURATION_S, MAX_DURATION_S))
    waveform = generate_clip(label, rng, sample_rate, duration_s)  # (N,)
    if channels == 2:
        # A quieter right channel: the pipeline's downmix must not care.
        waveform = np.stack([waveform, waveform * rng.uniform(0.5, 1.0)], axis=1)  # (N, 2)
    metadata = {
        "label": label,
        "generator": "pipeline.commands.synthetic",
        "sample_rate": sample_rate,
        "channels": channels,
        "duration_s": round(duration_s, 3),
        "encoding": f"{container} {subtype}",
    }
    return container, _encode(waveform, sample_rate, container, subtype), metadata


def write_demo_corpus(directory: str | Path, seed: int = 0) -> DemoCorpus:
    """Writes NUM_SHARDS WebDataset shards (shard-000000.tar, ...) and returns where the truth is.

    Each sample is `<key>.wav|.flac` plus `<key>.json` ({"label": ...}), adjacent in the tar as
    WebDataset requires; the last shards each end with one broken file. The same seed writes the
    same bytes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = NUM_SHARDS * CLIPS_PER_SHARD
    labels = [CLASS_NAMES[i % len(CLASS_NAMES)] for i in rng.permutation(total)]  # balanced
    broken_samples = _broken_samples(rng)
    first_broken_shard = NUM_SHARDS - len(broken_samples)
    truth: dict[tuple[str, str], str] = {}
    broken: dict[tuple[str, str], str] = {}
    shards = []
    for shard_index in range(NUM_SHARDS):
        shard = directory / f"shard-{shard_index:06d}.tar"
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for clip_index in range(
                shard_index * CLIPS_PER_SHARD, (shard_index + 1) * CLIPS_PER_SHARD
            ):
                key, label = f"clip-{clip_index:04d}", labels[clip_index]
                extension, audio, metadata = _sample(label, rng)
                _add_member(tar, f"{key}.{extension}", audio)
                _add_member(tar, f"{key}.json", json.dumps(metadata).encode())
                truth[(shard.name, key)] = label
            if shard_index >= first_broken_shard:
                key, extension, data, reason = broken_samples[shard_index - first_broken_shard]
                _add_member(tar, f"{key}.{extension}", data)
                _add_member(
                    tar, f"{key}.json", json.dumps({"label": None, "broken": reason}).encode()
                )
                broken[(shard.name, key)] = reason
        shards.append(shard)
    novel = write_novel_shard(directory)
    shards.append(directory / NOVEL_SHARD)
    # Shards of an earlier, larger corpus in the same folder would be labelled too: remove them.
    for stale in sorted(set(directory.glob("shard-*.tar")) - set(shards)):
        stale.unlink()
    return DemoCorpus(directory, tuple(shards), truth, broken, novel)


# The columns the report reads; `embedding`, the bulk of a file, is left on disk.
REPORT_COLUMNS = ("shard", "key", "window_index", "scores", "error")


def read_labels(labels_dir: str | Path) -> tuple[pa.Table, tuple[str, ...], dict]:
    """All committed rows under labels_dir (REPORT_COLUMNS only), the label names and the file
    metadata of the output."""
    paths = sorted(Path(labels_dir).glob("*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no committed Parquet files in {labels_dir}")
    tables = [pq.read_table(path, columns=list(REPORT_COLUMNS)) for path in paths]
    metadata = json.loads((tables[0].schema.metadata or {}).get(METADATA_KEY, b"{}"))
    return pa.concat_tables(tables), tuple(metadata.get("label_names", ())), metadata


def file_results(table: pa.Table, label_names: Sequence[str]) -> list[FileResult]:
    """Folds window rows into one result per (shard, key): the label whose mean score over the
    file's windows is highest, or the file's error. Pure, so it is testable without Ray."""
    rows = table.select(list(REPORT_COLUMNS)).to_pylist()
    by_file: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_file.setdefault((Path(row["shard"]).name, row["key"]), []).append(row)
    results = []
    for (shard, key), windows in sorted(by_file.items()):
        errors = [row["error"] for row in windows if row["error"] is not None]
        scored = [
            row["scores"] for row in windows if row["error"] is None and row["scores"] is not None
        ]
        if errors or not scored:
            results.append(
                FileResult(
                    shard, key, len(windows), None, None, errors[0] if errors else "no scores"
                )
            )
            continue
        mean = np.mean(np.asarray(scored, dtype=np.float64), axis=0)  # (num_labels,)
        best = int(np.argmax(mean))
        results.append(
            FileResult(shard, key, len(windows), label_names[best], float(mean[best]), None)
        )
    return results


def build_report(corpus: DemoCorpus, summary: RunSummary, labels_dir: Path) -> DemoReport:
    table, label_names, _ = read_labels(labels_dir)
    results = file_results(table, label_names)
    return DemoReport(corpus, summary, labels_dir, tuple(results), find_misses(corpus, results))


def find_misses(
    corpus: DemoCorpus, results: Sequence[FileResult]
) -> tuple[tuple[FileResult, str], ...]:
    by_file = {(result.shard, result.key): result for result in results}
    misses = []
    for (shard, key), label in sorted(corpus.truth.items()):
        result = by_file.get(
            (shard, key), FileResult(shard, key, 0, None, None, "no rows in the output")
        )
        if result.predicted != label:
            misses.append((result, label))
    return tuple(misses)


def format_report(report: DemoReport) -> str:
    """The demo's closing summary: what was labelled how, how well, what failed, where it is."""
    corpus, summary = report.corpus, report.summary
    predicted = Counter(
        result.predicted
        for result in report.files
        if result.predicted is not None and (result.shard, result.key) not in corpus.novel
    )
    true_counts = Counter(corpus.truth.values())
    width = max((len(name) for name in [*predicted, *true_counts]), default=10)
    lines = [
        f"{len(report.files)} files ({summary.windows} windows) in {len(corpus.shards)} shards "
        "went through the pipeline.",
        "",
        "Files per predicted label (generator's count in brackets):",
    ]
    for name in sorted(set(predicted) | set(true_counts)):
        lines.append(
            f"  {name:<{width}}  {predicted.get(name, 0):4d}  ({true_counts.get(name, 0)})"
        )
    lines += [
        "",
        f"Accuracy against the generator's labels: {report.correct}/{len(corpus.truth)} "
        f"= {report.accuracy:.1%} (a file's label: the highest mean score over its windows)",
    ]
    for result, true_label in report.misses[:MAX_MISSES_SHOWN]:
        got = result.predicted or f"error: {result.error}"
        lines.append(f"  miss: {result.shard} {result.key}: true {true_label!r}, got {got!r}")
    if len(report.misses) > MAX_MISSES_SHOWN:
        lines.append(f"  ... and {len(report.misses) - MAX_MISSES_SHOWN} more")
    errors = [result for result in report.files if result.error is not None]
    lines += ["", f"Error rows: {len(errors)} (files that could not be labelled; the run went on):"]
    for result in errors:
        planted = corpus.broken.get((result.shard, result.key))
        note = f"  [planted: {planted}]" if planted else ""
        lines.append(f"  {result.shard} {result.key}: {result.error}{note}")
    audio_s = summary.audio_hours_now * 3600
    duckdb_query = (
        "SELECT key, window_index, top_labels[1] AS label, top_scores[1] AS score, error "
        f"FROM '{report.labels_dir}/*.parquet' LIMIT 10"
    )
    lines += [
        "",
        f"Throughput: {summary.files_now} files, {audio_s / 60:.1f} min of audio "
        f"in {summary.wall_s:.1f} s = {summary.files_per_s:.1f} files/s "
        "(Ray start-up included)",
        "",
        f"Labels (Parquet, one file per shard): {report.labels_dir}",
        "Read them with DuckDB or pandas:",
        f'  python -c "import duckdb; duckdb.sql(\\"{duckdb_query}\\").show()"',
        f"  python -c \"import pandas as pd; print(pd.read_parquet('{report.labels_dir}')"
        "[['key', 'window_index', 'top_labels', 'error']].head(10))\"",
        "Or let ast-label look (add --plot labels.png for pictures; the 'plot' extra):",
        f"  ast-label inspect {report.labels_dir} --label 'Pink noise' --min-score 0.9",
        "",
    ]
    said, *commands = recipe(report.labels_dir.parent)
    lines += [said, *_novel_lines(report), "Train a head on the examples, relabel with it:"]
    return "\n".join([*lines, *commands])


def _novel_lines(report: DemoReport) -> list[str]:
    """What the bundled model made of the sounds it never heard: the nearest class it knows."""
    called: dict[str, Counter] = {}
    for result in report.files:
        label = report.corpus.novel.get((result.shard, result.key))
        if label is not None and result.predicted is not None:
            called.setdefault(label, Counter())[result.predicted] += 1
    return [
        f"  {label}: labeled {', '.join(f'{name} x{n}' for name, n in counts.most_common())}"
        for label, counts in sorted(called.items())
    ]


def run_demo(
    output_dir: str | Path, model: str = DEFAULT_MODEL, echo: Callable[[str], None] = print
) -> DemoReport:
    """Writes the corpus to output_dir/corpus, labels it into output_dir/labels with the real
    pipeline on a Ray of this machine's own (whatever RAY_ADDRESS says), and prints the summary."""
    from pipeline.labeling.run import run_labeling
    from pipeline.settings import LabelingOptions, RunConfig

    output_dir = Path(output_dir).resolve()
    echo(f"Writing a synthetic corpus to {output_dir / 'corpus'} ...")
    corpus = write_demo_corpus(output_dir / "corpus")
    write_head_examples(output_dir / "head-examples")
    echo(
        f"{corpus.num_files} files in {len(corpus.shards)} WebDataset shards "
        f"({len(corpus.broken)} of them broken on purpose). Labelling with model {model!r} ..."
    )
    labels_dir = output_dir / "labels"
    # overwrite=True: a demo run relabels everything (and may use another --model than the last).
    config = RunConfig(
        inputs=(str(corpus.directory),),
        output=str(labels_dir),
        options=LabelingOptions(model=model),
        overwrite=True,
    )
    summary = run_labeling(config, echo=echo)
    report = build_report(corpus, summary, labels_dir)
    echo("")
    echo(format_report(report))
    return report
