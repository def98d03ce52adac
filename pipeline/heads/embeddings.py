"""The examples' window embeddings, from the same stages and numbers as `run` and `predict`.

Three ways to the same `Examples`:

    in this process  predict's Predictor: the run's read stage and classifier, without Ray
                     (up to --ray-above files)
    on Ray           run_labeling into a scratch output, then read back as below (more files,
                     or a cluster); with --scratch the output is kept and a rerun resumes it
    from an output   the rows of an output that `run` made with the same model (--from-output):
                     no audio is read

Each example file's windows are matched to its labeled spans (examples.Span.selects); windows
outside every span are no examples. A file that could not be decoded is kept as a failure with
its reason, never silently dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.heads.examples import ExamplesError, ExampleSpec, FileRef
from pipeline.labeling.plan import input_kind
from pipeline.output.reader import CommittedOutput, embedding_size, list_matrix
from pipeline.settings import LabelingOptions

if TYPE_CHECKING:  # the run's progress display; the run itself loads only when used
    from pipeline.labeling.run import RunProgress

PROGRESS_INTERVAL_S = 10.0
OUTPUT_COLUMNS = ("shard", "key", "window_index", "start_s", "end_s", "embedding", "error")


@dataclass(frozen=True)
class Examples:
    """The training set: one row per example window."""

    label_names: tuple[str, ...]
    embeddings: np.ndarray  # (N, D) float32: the pooled embeddings, as an output stores them
    targets: np.ndarray  # (N, H) bool: the window's labels
    file_of: np.ndarray  # (N,) int64: the window's file, an index into `files`
    files: tuple[FileRef, ...]  # (F,) the files that gave example windows
    base_model: dict[str, Any]  # name, weights_sha256, hidden_size
    window_s: float
    hop_s: float
    embedded_by: str  # where the embeddings came from, for the report
    failures: tuple[tuple[str, str], ...] = ()  # (file, reason): left out
    windows_outside_spans: int = 0  # windows of example files outside their labeled spans
    notes: tuple[str, ...] = field(default=())

    @property
    def file_targets(self) -> np.ndarray:
        """(F, H) bool: the labels of any of a file's windows."""
        targets = np.zeros((len(self.files), len(self.label_names)), dtype=bool)
        np.logical_or.at(targets, self.file_of, self.targets)
        return targets

    def files_per_label(self) -> dict[str, int]:
        counts = self.file_targets.sum(axis=0)
        return {name: int(count) for name, count in zip(self.label_names, counts, strict=True)}

    def windows_per_label(self) -> dict[str, int]:
        counts = self.targets.sum(axis=0)
        return {name: int(count) for name, count in zip(self.label_names, counts, strict=True)}


class _Collector:
    """Example windows as files arrive, matched to the spec's spans."""

    def __init__(self, spec: ExampleSpec):
        self.spec = spec
        self.column = {label: index for index, label in enumerate(spec.label_names)}
        # file -> its example windows: (W_f, D) embeddings and (W_f, H) targets
        self.windows: dict[FileRef, tuple[np.ndarray, np.ndarray]] = {}
        self.failures: dict[FileRef, str] = {}
        self.done: set[FileRef] = set()
        self.outside = 0
        self.without_windows = 0

    def add(self, ref: FileRef, starts: Sequence[float], ends: Sequence[float], vectors) -> None:
        """One file's windows: (W,) starts and ends, (W, D) embeddings."""
        spans = self.spec.spans.get(ref)
        if spans is None or ref in self.done:  # another member of a shard the examples name
            return
        self.done.add(ref)
        targets = np.zeros((len(starts), len(self.column)), dtype=bool)  # (W, H)
        for span in spans:
            for window, (start_s, end_s) in enumerate(zip(starts, ends, strict=True)):
                targets[window, self.column[span.label]] |= span.selects(start_s, end_s)
        kept = targets.any(axis=1)  # (W,)
        self.outside += int((~kept).sum())
        if not kept.any():
            self.without_windows += 1
            return
        self.windows[ref] = (np.asarray(vectors, dtype=np.float32)[kept], targets[kept])

    def fail(self, ref: FileRef, reason: str) -> None:
        if ref in self.spec.spans and ref not in self.done:
            self.done.add(ref)
            self.failures[ref] = reason

    def fail_shard(self, shard: str, reason: str) -> None:
        """The shard could not be read (to its end): its members not read yet fail with it."""
        for ref in self.spec.spans:
            if ref.shard == shard:
                self.fail(ref, reason)

    def finish(self, base_model: dict, window_s: float, hop_s: float, how: str) -> Examples:
        for ref in self.spec.spans:
            self.fail(ref, "not found when its shard was read")
        notes = list(self.spec.notes)
        if self.without_windows:
            notes.append(
                f"left out: {self.without_windows} files with no window in their labeled spans"
            )
        # Files in (shard, key) order, whichever order they were read in: the folds, and so the
        # head, are the same from audio, from Ray and from an output.
        files = sorted(self.windows)
        hidden, labels = int(base_model["hidden_size"]), len(self.column)
        embeddings = [self.windows[ref][0] for ref in files] or [np.zeros((0, hidden), np.float32)]
        targets = [self.windows[ref][1] for ref in files] or [np.zeros((0, labels), bool)]
        sizes = [len(self.windows[ref][0]) for ref in files]
        return Examples(
            label_names=self.spec.label_names,
            embeddings=np.concatenate(embeddings),  # (N, D)
            targets=np.concatenate(targets),  # (N, H)
            file_of=np.repeat(np.arange(len(files)), sizes).astype(np.int64),  # (N,)
            files=tuple(files),
            base_model=base_model,
            window_s=window_s,
            hop_s=hop_s,
            embedded_by=how,
            failures=tuple((ref.name, reason) for ref, reason in sorted(self.failures.items())),
            windows_outside_spans=self.outside,
            notes=tuple(notes),
        )


def embed_in_process(
    spec: ExampleSpec, options: LabelingOptions, echo: Callable[[str], None]
) -> Examples:
    """Labels the examples' files with predict's Predictor (run's stages, this process)."""
    from pipeline.commands.predict import PredictConfig, Predictor

    predictor = Predictor(PredictConfig(tuple(spec.input_uris()), None, options))
    loaded = predictor.loaded
    collector = _Collector(spec)
    shards = {ref.shard for ref in spec.spans if ref.shard}
    started = last_shown = time.monotonic()
    for result in predictor.label(predictor.plan().units):
        if result.shard is None and result.key in shards:  # the shard itself failed
            collector.fail_shard(result.key, str(result.error))
        elif result.shard and not result.key:  # a shard that broke off part-way
            collector.fail_shard(result.shard, str(result.error))
        elif result.error is not None:
            collector.fail(FileRef(result.shard or "", result.key), result.error)
        else:
            windows = result.windows
            collector.add(
                FileRef(result.shard or "", result.key),
                [window.start_s for window in windows],
                [window.end_s for window in windows],
                np.stack([window.embedding for window in windows]),  # (W, D)
            )
        if time.monotonic() - last_shown >= PROGRESS_INTERVAL_S:
            last_shown = time.monotonic()
            echo(_progress_line(collector, time.monotonic() - started))
    echo(_progress_line(collector, time.monotonic() - started))
    base_model = {
        "name": loaded.name,
        "weights_sha256": loaded.weights_sha256,
        "hidden_size": loaded.config.hidden_size,
    }
    read = predictor.read.read
    return collector.finish(
        base_model, read.window_s, read.hop_s, "predict's stages, in this process"
    )


def _progress_line(collector: _Collector, elapsed_s: float) -> str:
    total = len(collector.spec.spans)
    return (
        f"embeddings: {len(collector.done)} of {total} files, {len(collector.failures)} "
        f"failed, {sum(len(v) for v, _ in collector.windows.values())} windows, {elapsed_s:.0f} s"
    )


def embed_on_ray(
    spec: ExampleSpec,
    options: LabelingOptions,
    scratch: str,
    address: str | None,
    echo: Callable[[str], None],
    progress: RunProgress | None = None,
) -> Examples:
    """Labels the examples' files with run_labeling into `scratch`, then reads them back."""
    from pipeline.errors import RunIncomplete
    from pipeline.labeling.run import run_labeling
    from pipeline.output.reader import open_output
    from pipeline.settings import RunConfig

    config = RunConfig(tuple(spec.input_uris()), scratch, options, address=address)
    summary = run_labeling(config, echo=echo, progress=progress)
    if not summary.complete:
        raise RunIncomplete(
            f"{len(summary.units_failed)} work units of the examples did not commit (storage "
            "faults): run the same command again"
        )
    return read_from_output(spec, open_output(scratch), how=f"run on Ray, into {scratch}")


def read_from_output(spec: ExampleSpec, output: CommittedOutput, how: str = "") -> Examples:
    """The example files' rows of a finished output. ExamplesError when the examples name a
    file or shard that the output holds no rows of."""
    table = _example_rows(spec, output)
    shards = table["shard"].to_pylist()
    keys = table["key"].to_pylist()
    # A plain file's row names its unit in `shard`; the examples name it by its URI alone.
    refs = [
        FileRef(shard if input_kind(shard) == "tar" else "", key)
        for shard, key in zip(shards, keys, strict=True)
    ]
    members: dict[str, dict[str, None]] = {}  # shard -> its keys in the output, in order
    for ref in refs:
        if ref.shard:
            members.setdefault(ref.shard, {})[str(ref.key)] = None
    missing = [ref for ref in spec.spans if ref.key is None and ref.shard not in members]
    spec = spec.expanded({**members, **{ref.shard: {} for ref in missing}})
    missing += sorted(set(spec.spans) - set(refs))
    if missing:
        raise ExamplesError(
            f"output {output.uri} holds no rows of {missing[0].name}, which examples "
            f"{spec.location} name ({len(missing)} such): label them with `ast-label run` into "
            "that output, or leave them out of the examples"
        )
    hidden = embedding_size(output, "a head has nothing to learn from")
    vectors = _embedding_matrix(table, hidden)  # (R, D), zeros on error rows
    errors = table["error"].to_pylist()
    starts = table["start_s"].to_numpy()
    ends = table["end_s"].to_numpy()
    collector = _Collector(spec)
    boundaries = [0] + [i for i in range(1, len(refs)) if refs[i] != refs[i - 1]] + [len(refs)]
    for first, last in zip(boundaries[:-1], boundaries[1:], strict=True):
        if errors[first] is not None:
            collector.fail(refs[first], errors[first])
        else:
            collector.add(refs[first], starts[first:last], ends[first:last], vectors[first:last])
    metadata = output.metadata
    base_model = {
        "name": metadata.get("model", "?"),
        "weights_sha256": metadata.get("weights_sha256", ""),
        "hidden_size": hidden,
    }
    window_s, hop_s = float(metadata.get("window_s", 0.0)), float(metadata.get("hop_s", 0.0))
    return collector.finish(base_model, window_s, hop_s, how or f"the rows of output {output.uri}")


def _example_rows(spec: ExampleSpec, output: CommittedOutput) -> pa.Table:
    """The rows that may belong to example files, sorted by file and window. Read unit file by
    unit file, as inspect does: a damaged file is the output's fault, a failing read the
    store's (retried, then exit 3)."""
    plain = pa.array(sorted({str(ref.key) for ref in spec.spans if not ref.shard}), pa.string())
    shards = pa.array(sorted({ref.shard for ref in spec.spans if ref.shard}), pa.string())
    wanted = pc.field("key").isin(plain) | pc.field("shard").isin(shards)
    tables = [
        output.read_unit_file(
            lambda fragment=fragment: fragment.to_table(
                columns=list(OUTPUT_COLUMNS), filter=wanted
            ),
            fragment.path,
        )
        for fragment in output.dataset().get_fragments()
    ]
    order = [("shard", "ascending"), ("key", "ascending"), ("window_index", "ascending")]
    return pa.concat_tables(tables).sort_by(order)


def _embedding_matrix(table: pa.Table, hidden: int) -> np.ndarray:
    """(R, D) float32 of the embedding column; rows without one (errors) hold zeros."""
    valid = np.asarray(table["embedding"].is_valid(), dtype=bool)  # (R,)
    return np.where(valid[:, None], list_matrix(table["embedding"], hidden), np.float32(0))
