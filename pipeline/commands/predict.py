"""`ast-label predict`: the labeling of `ast-label run`, in this process and without Ray.

The inputs are planned into the run's work units (pipeline.labeling.plan), and the run's own
stages (`ReadStage`, then `Classify`) turn them into window rows with scores, so the files,
windows and numbers are a run's. Instead of Parquet, each file comes back as one `FileLabels`, in
plan order: its windows, or the reason it could not be labeled.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from ast_model.checkpoint import load_checkpoint
from ast_model.labels import top_label_ids
from pipeline import rows
from pipeline.errors import UserError
from pipeline.heads.head import load_head
from pipeline.labeling.classify import Classify, resolve_device
from pipeline.labeling.plan import Plan, WorkUnit, plan_work_units
from pipeline.labeling.read import ReadStage
from pipeline.settings import ClassifierSettings, LabelingOptions

# JSON scores keep 6 decimals: far below any difference that matters, and lines stay short.
SCORE_DECIMALS = 6


@dataclass(frozen=True)
class PredictConfig:
    inputs: tuple[str, ...]
    manifest: str | None = None
    options: LabelingOptions = LabelingOptions()  # the same as `run`'s, with the same checks


@dataclass(frozen=True)
class WindowLabels:
    index: int
    start_s: float
    end_s: float
    scores: np.ndarray  # (C,) float32
    embedding: np.ndarray  # (D,) float32
    head_scores: np.ndarray | None = None  # (H,) float32 with --head


@dataclass(frozen=True)
class FileLabels:
    """One input file's outcome: its windows' labels, or the reason it has none."""

    key: str  # the file's URI, or its WebDataset key inside `shard`
    shard: str | None  # the tar shard's URI for a tar member; None for a plain file
    duration_s: float = 0.0
    windows: tuple[WindowLabels, ...] = ()
    error: str | None = None

    @property
    def scores(self) -> np.ndarray:
        """(C,) the mean of the windows' scores: the file's label scores."""
        return np.mean([window.scores for window in self.windows], axis=0, dtype=np.float64)

    @property
    def embedding(self) -> np.ndarray:
        """(D,) the mean of the windows' embeddings."""
        return np.mean([window.embedding for window in self.windows], axis=0, dtype=np.float64)

    @property
    def head_scores(self) -> np.ndarray | None:
        """(H,) the mean of the windows' head scores (with --head)."""
        if not self.windows or self.windows[0].head_scores is None:
            return None
        return np.mean([window.head_scores for window in self.windows], axis=0, dtype=np.float64)


class Predictor:
    """The model and the run's stages, built once: checks the options as `run` does, loads the
    model (CheckpointError when it cannot), then labels work units in this process."""

    def __init__(self, config: PredictConfig):
        self.config = config
        options = config.options
        if not config.inputs and not config.manifest:
            raise UserError("give at least one INPUT or --manifest")
        options.check()
        self.loaded = load_checkpoint(options.model)
        fbank = options.fbank_config(self.loaded.config)
        use_gpu = resolve_device(options.device).type == "cuda"
        features = options.feature_settings(fbank, use_gpu)
        self.read = ReadStage(options.read_settings(fbank), features)
        classifier = ClassifierSettings(options.device, options.precision, options.top_k)
        self.head = load_head(options.head) if options.head else None
        if self.head is not None:
            loaded = self.loaded
            where = f"model {loaded.name}"
            self.head.check_base(loaded.weights_sha256, loaded.config.hidden_size, where)
        self.classify = Classify(self.loaded, classifier, self.head)
        self.label_names: tuple[str, ...] = tuple(self.loaded.config.id2label)

    def plan(self) -> Plan:
        """The inputs as `run` plans them; raises InputError for a missing input or manifest."""
        return plan_work_units(self.config.inputs, self.config.manifest)

    def label(self, units: Iterable[WorkUnit]) -> Iterator[FileLabels]:
        """Each file of the units, in order, as soon as its last window is classified."""
        units = list(units)
        by_id = {unit.unit_id: unit for unit in units}
        current: _FileRows | None = None
        yielded: set[tuple[str, str]] = set()  # (unit id, key)
        for batch in self.read.batches(units):
            batch = self.classify(batch)
            for row in range(len(batch[rows.KEY])):
                if current is not None and not current.continues(batch, row):
                    yielded.add((current.unit_id, current.key))
                    yield current.finish()
                    current = None
                unit = by_id[str(batch[rows.UNIT_ID][row])]
                if failure := str(batch[rows.UNIT_FAILURE][row]):
                    # The store failed (after the retries) part-way through the unit: what was
                    # not read yet ends as errors saying why.
                    yield from _unread_files(unit, yielded, failure)
                    continue
                if current is None:
                    current = _FileRows(unit, batch, row)
                current.add(batch, row)
        if current is not None:
            yield current.finish()

    def records(
        self,
        result: FileLabels,
        windows: bool = False,
        scores: bool = False,
        embedding: bool = False,
    ) -> list[dict]:
        """JSON-ready objects: one per file (or per window with `windows`); a failed file is one
        object with its `error`. `labels` maps the top-k label names to scores, best first."""
        head: dict = {"key": result.key}
        if result.shard:
            head["shard"] = result.shard
        if result.error is not None:
            return [{**head, "error": result.error}]
        if not windows:
            fields = {"windows": len(result.windows)}
            parts = [(fields, result.scores, result.embedding, result.head_scores)]
        else:
            parts = [
                (
                    {"window_index": w.index, "start_s": w.start_s, "end_s": w.end_s},
                    w.scores,
                    w.embedding,
                    w.head_scores,
                )
                for w in result.windows
            ]
        records = []
        for fields, values, vector, head_values in parts:
            record = {**head, "duration_s": result.duration_s, **fields}
            record["labels"] = self._top_labels(values)
            if scores:
                record["scores"] = _by_name(self.label_names, values)
            if self.head is not None:
                record.update(self._head_fields(head_values, scores))
            if embedding:
                record["embedding"] = np.asarray(vector, dtype=np.float32).tolist()
            records.append(record)
        return records

    def _head_fields(self, head_scores: np.ndarray, scores: bool) -> dict:
        """`head_labels`: the head's labels at or above their thresholds, best first, with their
        scores (and every head score under `head_scores` with --scores)."""
        (passed,) = self.head.labels(np.asarray(head_scores, dtype=np.float32)[None, :])
        index = {name: i for i, name in enumerate(self.head.label_names)}
        fields = {
            "head_labels": {n: round(float(head_scores[index[n]]), SCORE_DECIMALS) for n in passed}
        }
        if scores:
            fields["head_scores"] = _by_name(self.head.label_names, head_scores)
        return fields

    def _top_labels(self, scores: np.ndarray) -> dict[str, float]:
        top = top_label_ids(np.asarray(scores)[None, :], self.classify.top_k)[0]
        return {self.label_names[i]: round(float(scores[i]), SCORE_DECIMALS) for i in top}


def _by_name(names: tuple[str, ...], values: np.ndarray) -> dict[str, float]:
    return {name: round(float(v), SCORE_DECIMALS) for name, v in zip(names, values, strict=True)}


def text_line(record: Mapping) -> str:
    """A record as one line: `NAME: label 0.912, label 0.034` (a window adds its index and time
    span; a head its labels after `|`), or `NAME: cannot label: reason`."""
    name = f"{record['shard']} {record['key']}" if "shard" in record else record["key"]
    if "error" in record:
        return f"{name}: cannot label: {record['error']}"
    if "window_index" in record:
        name += f" [{record['window_index']}] {record['start_s']:.2f}-{record['end_s']:.2f} s"
    labels = ", ".join(f"{label} {score:.3f}" for label, score in record["labels"].items())
    if "head_labels" in record:
        passed = record["head_labels"].items()
        labels += " | head: " + (", ".join(f"{n} {v:.3f}" for n, v in passed) or "(none)")
    return f"{name}: {labels}"


class _FileRows:
    """The rows of one file as they arrive (a file's windows may span batches)."""

    def __init__(self, unit: WorkUnit, batch: Mapping[str, np.ndarray], row: int):
        self.unit_id = unit.unit_id
        self.key = str(batch[rows.KEY][row])
        self.shard = unit.sources[0] if unit.kind == "tar" else None
        self.duration_s = float(batch[rows.DURATION_S][row])
        self.error = str(batch[rows.ERROR][row]) or None
        self.windows: list[WindowLabels] = []

    def continues(self, batch: Mapping[str, np.ndarray], row: int) -> bool:
        """Whether the row is a further window of this file: every file starts at window 0."""
        return (
            int(batch[rows.WINDOW_INDEX][row]) > 0
            and str(batch[rows.UNIT_ID][row]) == self.unit_id
            and str(batch[rows.KEY][row]) == self.key
        )

    def add(self, batch: Mapping[str, np.ndarray], row: int) -> None:
        if self.error is None:
            self.windows.append(
                WindowLabels(
                    index=int(batch[rows.WINDOW_INDEX][row]),
                    start_s=float(batch[rows.START_S][row]),
                    end_s=float(batch[rows.END_S][row]),
                    scores=batch[rows.SCORES][row].copy(),
                    embedding=batch[rows.EMBEDDING][row].copy(),
                    head_scores=(
                        batch[rows.HEAD_SCORES][row].copy() if rows.HEAD_SCORES in batch else None
                    ),
                )
            )

    def finish(self) -> FileLabels:
        return FileLabels(self.key, self.shard, self.duration_s, tuple(self.windows), self.error)


def _unread_files(
    unit: WorkUnit, yielded: set[tuple[str, str]], reason: str
) -> Iterator[FileLabels]:
    if unit.kind == "tar":  # the shard could not be read to its end
        yield FileLabels(key=unit.sources[0], shard=None, error=reason)
        return
    for uri in unit.sources:
        if (unit.unit_id, uri) not in yielded:
            yield FileLabels(key=uri, shard=None, error=reason)
