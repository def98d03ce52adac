"""The stages of a labeling run: plain callables on batches (`dict[str, np.ndarray]`, see
pipeline.rows), free of Ray: run.py places them on Ray (pipeline.datasource feeds the read
stage), predict.py runs them in this process.

- `WindowFeatures`: work units -> window rows with their fbank. Fetch, decode, resample, window and
  fbank happen in one process, so a waveform never crosses a process boundary; what leaves is a
  fixed-shape (B, T, F) tensor in the classifier's input dtype, B = the classifier's batch size.
- `Classify`: fbank -> pooled embedding, label scores and top-k, one model per actor;
  `ClassifyAndStage` also writes the results as staging parts, in the same process.

Heavy state (the model, resamplers, the mel filterbank, filesystems) is built once per process,
never per batch. Per-clip failures never raise: they travel as rows whose `error` column holds the
reason, and the later stages pass such rows through untouched. A storage fault ends its unit with
a `unit_failure` row instead (the unit is not committed; a rerun reads it again).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ast_model.checkpoint import LoadedModel
from ast_model.features import FbankConfig, compute_fbank, pad_waveforms
from ast_model.labels import scores_from_logits
from pipeline import defaults
from pipeline import rows as R
from pipeline.audio import AudioError, cut_windows, decode_audio
from pipeline.output import OutputSpec, write_staging_parts
from pipeline.sources import Member, WorkUnit, read_unit_members
from pipeline.storage import StorageError, error_reason

# --precision -> the autocast dtype (None: plain fp32).
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ReadSettings:
    window_s: float
    hop_s: float
    max_duration_s: float
    max_member_bytes: int


@dataclass(frozen=True)
class FeatureSettings:
    """How a read task turns windows into the classifier's input."""

    fbank: FbankConfig
    dtype: str = "float32"  # a key of rows.FEATURE_DTYPES: the classifier's input dtype
    batch_rows: int = defaults.CPU_BATCH_SIZE  # rows per batch: the classifier's batch size


def shard_name(unit: WorkUnit) -> str:
    """The `shard` column: a tar shard is named by its URI; a group of plain files by its id."""
    return unit.sources[0] if unit.kind == "tar" else unit.unit_id


class WindowFeatures:
    """Work units -> batches of window rows with their fbank (one read task's work).

    Batches hold `batch_rows` rows (the last one fewer) and may mix units: a unit's rows can span
    batches, and its last row, held back until the unit is finished, carries the unit's row count
    (rows.UNIT_ROWS). Every unit yields at least one row.
    """

    def __init__(self, read: ReadSettings, features: FeatureSettings):
        self.read = read
        self.features = features
        self.numpy_dtype = R.FEATURE_DTYPES[features.dtype]

    def batches(self, units: Iterable[WorkUnit]) -> Iterator[dict[str, np.ndarray]]:
        size = self.features.batch_rows
        pending: list[tuple[dict, np.ndarray | None]] = []  # (row, window waveform or None)
        for unit in units:
            total = 0
            for item in self.unit_rows(unit):
                pending.append(item)
                total += 1
                if len(pending) > size:  # keep >= 1 row back: the unit's last row is not known yet
                    yield self.to_batch(pending[:size])
                    del pending[:size]
            if total == 0:
                # Readers yield >= 1 Member per unit; were one not to, the count below would land
                # on the previous unit's last row. The unit fails instead (a rerun reads it again).
                failure = _failure_row(unit.unit_id, shard_name(unit), "the unit yielded no files")
                pending.append((failure, None))
                total = 1
            pending[-1][0][R.UNIT_ROWS] = total
        for start in range(0, len(pending), size):
            yield self.to_batch(pending[start : start + size])

    def unit_rows(self, unit: WorkUnit) -> Iterator[tuple[dict, np.ndarray | None]]:
        """One unit's rows: each file's windows or error row; a unit-failure row last if its
        storage failed. Never raises."""
        shard = shard_name(unit)
        members = read_unit_members(unit, self.read.max_member_bytes)
        try:
            for member in members:
                yield from self.member_rows(unit.unit_id, shard, member)
        except StorageError as error:
            yield _failure_row(unit.unit_id, shard, str(error)), None
        except Exception as error:  # a bug must not take the other units of the run down with it
            yield _failure_row(unit.unit_id, shard, f"internal error: {error_reason(error)}"), None

    def member_rows(
        self, unit_id: str, shard: str, member: Member
    ) -> Iterator[tuple[dict, np.ndarray | None]]:
        """One file -> its windows' rows and waveforms, or one error row with the reason."""
        row = R.empty_row(unit_id, shard, member.key)
        row[R.METADATA] = member.metadata or ""
        if member.error is not None:
            row[R.ERROR] = member.error
            yield row, None
            return
        try:
            decoded = decode_audio(member.audio, member.audio_format, self.read.max_duration_s)
        except AudioError as error:
            row[R.ERROR] = str(error)
            yield row, None
            return
        row[R.DURATION_S] = decoded.duration_s
        row[R.SAMPLE_RATE] = decoded.source_sample_rate
        for window in cut_windows(decoded.waveform, self.read.window_s, self.read.hop_s):
            window_row = dict(row)
            window_row[R.WINDOW_INDEX] = window.index
            window_row[R.START_S] = window.start_s
            window_row[R.END_S] = min(window.end_s, decoded.duration_s)
            yield window_row, window.waveform

    def to_batch(self, items: Sequence[tuple[dict, np.ndarray | None]]) -> dict[str, np.ndarray]:
        batch = R.rows_to_columns([row for row, _ in items])
        config = self.features.fbank
        labeled = [i for i, (_, waveform) in enumerate(items) if waveform is not None]
        if len(labeled) == len(items):
            batch[R.FBANK] = self._fbank([waveform for _, waveform in items])
        else:
            # Rows without audio get an all-zero fbank that the classifier never looks at.
            fbank = np.zeros((len(items), config.max_length, config.num_mel_bins), self.numpy_dtype)
            if labeled:
                fbank[labeled] = self._fbank([items[i][1] for i in labeled])
            batch[R.FBANK] = fbank
        return batch

    def _fbank(self, waveforms: list[np.ndarray]) -> np.ndarray:
        padded, lengths = pad_waveforms(waveforms)  # (B, N), (B,)
        with torch.inference_mode():
            fbank = compute_fbank(padded, lengths, self.features.fbank)  # (B, T, F) float32
        return fbank_to_numpy(fbank, self.features.dtype)


def _failure_row(unit_id: str, shard: str, reason: str) -> dict:
    row = R.empty_row(unit_id, shard, "")
    row[R.UNIT_FAILURE] = reason
    return row


def fbank_to_numpy(fbank: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 fbank -> the numpy form of the classifier's input dtype (bf16 as raw uint16 bits)."""
    if dtype == "float32":
        return fbank.numpy()
    if dtype == "float16":
        return fbank.half().numpy()
    return fbank.bfloat16().view(torch.int16).numpy().view(np.uint16)


def fbank_to_torch(fbank: np.ndarray) -> torch.Tensor:
    """The inverse of fbank_to_numpy, without a copy: (B, T, F) float32, float16 or bfloat16."""
    with warnings.catch_warnings():
        # Batches from Ray's object store are read-only; the model only reads its input.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if fbank.dtype == np.uint16:
            return torch.from_numpy(fbank.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(fbank)


def feature_dtype(precision: str, use_gpu: bool) -> str:
    """The fbank dtype read tasks send: the autocast dtype when the classifier computes in one.

    Under autocast the patch embedding's convolution, the first thing to read the fbank, casts
    its input to that dtype, so sending it already cast changes no number and halves what crosses
    the object store.
    """
    autocast = resolve_precision(precision, torch.device("cuda" if use_gpu else "cpu"))
    return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[autocast]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return _AUTOCAST[precision]


@dataclass(frozen=True)
class StoredModel:
    """A LoadedModel that the driver put in Ray's object store once: every actor fetches it from
    there instead of re-reading the checkpoint (a hub id or s3:// URI) itself.

    Wrapped rather than passed as a bare ObjectRef: Ray counts a bare ref as an actor argument
    "in the object store" and logs an error-level line at every actor start (a restart could not
    recreate a lost argument). The driver holds the reference for the whole run, so it is not lost.
    """

    ref: Any  # ray.ObjectRef

    def load(self) -> LoadedModel:
        import ray

        return ray.get(self.ref)


class Classify:
    """One model per instance: fbank -> pooled embedding, label scores, top-k label ids."""

    def __init__(
        self,
        loaded: LoadedModel | StoredModel,
        device: str,
        precision: str,
        top_k: int,
        cpu_threads: int | None = None,
    ):
        if isinstance(loaded, StoredModel):
            loaded = loaded.load()
        self.device = resolve_device(device)
        if self.device.type == "cpu" and cpu_threads:
            # Ray pins OMP_NUM_THREADS to the actor's CPU request (1); on a CPU-only machine the
            # model is the bottleneck and should use the cores that the light stages leave idle.
            torch.set_num_threads(min(cpu_threads, os.cpu_count() or 1))
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.model = loaded.model.to(self.device).eval()
        self.multi_label = loaded.config.multi_label
        self.hidden_size = loaded.config.hidden_size
        self.num_labels = loaded.config.num_labels
        self.top_k = min(top_k, self.num_labels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fbank = batch.pop(R.FBANK)  # (B, T, F)
        labeled = R.labeled_rows(batch)
        count = len(labeled)
        if labeled.all():
            embedding, scores = self._forward(fbank_to_torch(fbank))
        else:
            embedding = np.zeros((count, self.hidden_size), dtype=np.float32)
            scores = np.zeros((count, self.num_labels), dtype=np.float32)
            index = np.flatnonzero(labeled)
            if len(index):
                embedding[index], scores[index] = self._forward(fbank_to_torch(fbank)[index])
        batch[R.EMBEDDING] = embedding
        batch[R.SCORES] = scores
        batch[R.TOP_INDEX] = top_label_ids(scores, self.top_k)
        return batch

    @torch.inference_mode()
    def _forward(self, fbank: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, T, F) -> (B, D) embedding and (B, C) scores, float32 numpy."""
        compute_dtype = self.autocast_dtype or torch.float32
        # Features may arrive in a narrower dtype than the model computes in (an actor that fell
        # back to the CPU): the model casts them to its own unless autocast does.
        inputs = fbank.to(self.device, non_blocking=True)
        with torch.autocast(
            self.device.type, dtype=compute_dtype, enabled=self.autocast_dtype is not None
        ):
            output = self.model(inputs)
        scores = scores_from_logits(output.logits.float(), self.multi_label)
        return output.embedding.float().cpu().numpy(), scores.cpu().numpy()


class ClassifyAndStage:
    """The classifier actors' stage on Ray: Classify a batch, then write its rows as staging parts
    (pipeline.output.write_staging_parts) from the same process; only the small records of the
    parts leave it. Results never cross a process boundary, and no process is started per write:
    separate write tasks cost a worker start (2 CPU-s of imports) for each burst of parts."""

    def __init__(self, spec: OutputSpec, *classify_args):
        self.classify = Classify(*classify_args)
        self.spec = spec

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return write_staging_parts(self.classify(batch), self.spec)


def top_label_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, C) scores -> (B, k) int32 label ids, best first; ties go to the lower id."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int32)
