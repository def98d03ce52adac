"""The Ray Data stages of a labeling run: each takes and returns a batch `dict[str, np.ndarray]`.

Heavy state (the model, the mel filterbank) is built once per actor in `__init__`, never per batch.
Per-clip failures never raise: they travel as rows whose `error` column holds the reason, and the
later stages pass such rows through untouched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray
import torch

from ast_model.checkpoint import LoadedModel
from ast_model.features import FbankConfig, compute_fbank, pad_waveforms
from ast_model.labels import scores_from_logits
from pipeline.audio import AudioError, cut_windows, decode_audio
from pipeline.sources import WorkUnit, read_unit_members

# Rows a read task buffers before yielding a block: 32 windows of 10.24 s are 21 MB of float32.
READ_BLOCK_ROWS = 32


@dataclass(frozen=True)
class ReadSettings:
    window_s: float
    hop_s: float
    max_duration_s: float
    max_member_bytes: int


def _shard_name(unit: WorkUnit) -> str:
    # A tar shard is named by its URI; a group of plain files by its work-unit id.
    return unit.sources[0] if unit.kind == "tar" else unit.unit_id


def _row(unit: WorkUnit, key: str, **values) -> dict:
    row = dict(
        unit_id=unit.unit_id,
        shard=_shard_name(unit),
        key=key,
        window=0,
        start_s=0.0,
        end_s=0.0,
        duration_s=0.0,
        sample_rate=0,
        metadata=None,
        error=None,
        waveform=np.zeros(0, dtype=np.float32),
        unit_rows=0,
    )
    row.update(values)
    return row


def _rows_for_member(unit: WorkUnit, member, settings: ReadSettings) -> list[dict]:
    """One audio file -> its window rows, or a single error row with the reason."""
    if member.error is not None:
        return [_row(unit, member.key, metadata=member.metadata, error=member.error)]
    try:
        decoded = decode_audio(member.audio, member.audio_format, settings.max_duration_s)
    except AudioError as error:
        return [_row(unit, member.key, metadata=member.metadata, error=str(error))]
    common = dict(
        duration_s=decoded.duration_s,
        sample_rate=decoded.source_sample_rate,
        metadata=member.metadata,
    )
    return [
        _row(
            unit,
            member.key,
            window=window.index,
            start_s=window.start_s,
            end_s=window.end_s,
            waveform=window.waveform,
            **common,
        )
        for window in cut_windows(decoded.waveform, settings.window_s, settings.hop_s)
    ]


def _to_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    batch = {}
    for column in rows[0]:
        values = [row[column] for row in rows]
        if column == "waveform":
            # Ragged float32 arrays; Ray stores them as a variable-shaped tensor column.
            holder = np.empty(len(values), dtype=object)
            holder[:] = values
            batch[column] = holder
        elif column in ("metadata", "error"):
            # "" stands for null between stages: a block whose values were all None would get
            # Arrow's null type, come back as float NaN, and then fail to merge with a block of
            # strings. The writer turns "" back into null.
            batch[column] = np.array(
                ["" if value is None else value for value in values], dtype=object
            )
        else:
            batch[column] = np.array(values)
    batch["window"] = batch["window"].astype(np.int32)
    batch["sample_rate"] = batch["sample_rate"].astype(np.int32)
    batch["unit_rows"] = batch["unit_rows"].astype(np.int32)
    return batch


def read_units(
    batch: dict[str, np.ndarray], settings: ReadSettings
) -> Iterator[dict[str, np.ndarray]]:
    """Work units -> window rows, streamed in blocks of about READ_BLOCK_ROWS rows.

    The unit's total row count is known only once its last member is decoded, so the last row is
    held back and carries it in `unit_rows` (0 on every other row); the commit step uses it to
    know when all of a unit's rows have reached the writer.
    """
    for text in batch["unit"]:
        unit = WorkUnit.from_json(str(text))
        pending: list[dict] = []
        total = 0
        for member in read_unit_members(unit, settings.max_member_bytes):
            rows = _rows_for_member(unit, member, settings)
            total += len(rows)
            pending.extend(rows)
            if len(pending) > READ_BLOCK_ROWS:
                yield _to_batch(pending[:-1])
                pending = pending[-1:]
        if not pending:  # read_unit_members yields at least one member; keep the invariant anyway
            pending = [_row(unit, "", error="shard yielded no members")]
            total = 1
        pending[-1]["unit_rows"] = total
        yield _to_batch(pending)


class Featurize:
    """CPU actor: window waveforms -> normalised Kaldi fbank, (B, max_length, mel bins) float32."""

    def __init__(self, fbank_config: FbankConfig):
        self.fbank_config = fbank_config

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        waveforms = batch.pop("waveform")
        ok = _ok_rows(batch)
        count = len(ok)
        features = np.zeros(
            (count, self.fbank_config.max_length, self.fbank_config.num_mel_bins), dtype=np.float32
        )
        index = np.flatnonzero(ok)
        if len(index):
            padded, lengths = pad_waveforms([waveforms[i] for i in index])  # (B, N), (B,)
            with torch.inference_mode():
                features[index] = compute_fbank(padded, lengths, self.fbank_config).numpy()
        batch["features"] = features
        return batch


def _ok_rows(batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.array([not error for error in batch["error"]], dtype=bool)  # "" means no error


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Classify:
    """Actor holding one model: fbank -> pooled embedding, label scores, top-k indices."""

    def __init__(
        self,
        loaded: LoadedModel | ray.ObjectRef,
        device: str,
        precision: str,
        top_k: int,
        cpu_threads: int | None = None,
    ):
        if isinstance(loaded, ray.ObjectRef):
            # The driver puts the loaded model in the object store once; every actor fetches it
            # from there instead of re-reading the checkpoint (a hub id or s3:// URI) itself.
            loaded = ray.get(loaded)
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
        features = batch.pop("features")  # (B, T, F)
        ok = _ok_rows(batch)
        count = len(ok)
        embedding = np.zeros((count, self.hidden_size), dtype=np.float32)
        scores = np.zeros((count, self.num_labels), dtype=np.float32)
        index = np.flatnonzero(ok)
        if len(index):
            embedding[index], scores[index] = self._forward(features[index])
        top_index = np.argsort(-scores, axis=1, kind="stable")[:, : self.top_k]  # (B, k)
        batch["embedding"] = embedding
        batch["scores"] = scores
        batch["top_index"] = top_index.astype(np.int32)
        return batch

    @torch.inference_mode()
    def _forward(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inputs = torch.from_numpy(np.ascontiguousarray(features)).to(self.device)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            output = self.model(inputs)
        scores = scores_from_logits(output.logits.float(), self.multi_label)
        return output.embedding.float().cpu().numpy(), scores.cpu().numpy()
