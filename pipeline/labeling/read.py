"""The read stage: work units -> batches of window rows with their fbank (one read task's work).

Fetch, decode, resample, window and fbank happen in one process, so a waveform never crosses a
process boundary; what leaves is a fixed-shape (B, T, F) tensor in the classifier's input dtype,
B = the classifier's batch size. Runs in the read tasks of pipeline.labeling.datasource (and in
`predict`'s own process); it loads torch, so the driver never imports this module.

Per-clip failures never raise: they travel as rows whose `error` column holds the reason. A
storage fault ends its unit with a `unit_failure` row instead (the unit is not committed; a rerun
reads it again). See pipeline.rows for the columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from ast_model.features import compute_fbank, num_fbank_frames, pad_waveforms
from pipeline import rows
from pipeline.audio import AudioError, cut_windows, decode_audio
from pipeline.labeling.members import Member, read_unit_members
from pipeline.labeling.plan import WorkUnit
from pipeline.labeling.transport import fbank_to_numpy
from pipeline.settings import FeatureSettings, ReadSettings
from pipeline.storage import StorageError, error_reason

Item = tuple[dict, np.ndarray | None]  # a row's descriptive values, and its window's waveform


class ReadStage:
    """Batches hold `batch_rows` rows (the last one fewer) and may mix units: a unit's rows can
    span batches, and its last row, held back until the unit is finished, carries the unit's row
    count (rows.UNIT_ROWS). Every unit yields at least one row."""

    def __init__(self, read: ReadSettings, features: FeatureSettings):
        self.read = read
        self.features = features
        self.numpy_dtype = rows.FEATURE_DTYPES[features.dtype]

    def batches(self, units: Iterable[WorkUnit]) -> Iterator[dict[str, np.ndarray]]:
        size = self.features.batch_rows
        pending: list[Item] = []
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
                pending.append((_failure_row(unit, "the unit yielded no files"), None))
                total = 1
            pending[-1][0][rows.UNIT_ROWS] = total
        for start in range(0, len(pending), size):
            yield self.to_batch(pending[start : start + size])

    def unit_rows(self, unit: WorkUnit) -> Iterator[Item]:
        """One unit's rows: each file's windows or error row; a unit-failure row last if its
        storage failed. Never raises."""
        members = read_unit_members(unit, self.read.max_member_bytes)
        try:
            for member in members:
                yield from self.member_rows(unit, member)
        except StorageError as error:
            yield _failure_row(unit, str(error)), None
        except Exception as error:  # a bug must not take the other units of the run down with it
            yield _failure_row(unit, f"internal error: {error_reason(error)}"), None

    def member_rows(self, unit: WorkUnit, member: Member) -> Iterator[Item]:
        """One file -> its windows' rows and waveforms, or one error row with the reason."""
        row = rows.empty_row(unit.unit_id, unit.shard, member.key)
        row[rows.METADATA] = member.metadata or ""
        row[rows.SOURCE_BYTES] = len(member.audio) if member.audio is not None else 0
        if member.error is not None:
            row[rows.ERROR] = member.error
            yield row, None
            return
        try:
            decoded = decode_audio(member.audio, member.audio_format, self.read.max_duration_s)
        except AudioError as error:
            row[rows.ERROR] = str(error)
            yield row, None
            return
        row[rows.DURATION_S] = decoded.duration_s
        row[rows.SAMPLE_RATE] = decoded.source_sample_rate
        fbank = self.features.fbank
        for window in cut_windows(decoded.waveform, self.read.window_s, self.read.hop_s):
            window_row = dict(row)
            if window.index:  # the file's bytes count once, on its first window
                window_row[rows.SOURCE_BYTES] = 0
            window_row[rows.WINDOW_INDEX] = window.index
            window_row[rows.START_S] = window.start_s
            window_row[rows.END_S] = min(window.end_s, decoded.duration_s)
            frames = num_fbank_frames(len(window.waveform), fbank)
            window_row[rows.FRAMES] = min(frames, fbank.max_length)
            yield window_row, window.waveform

    def to_batch(self, items: Sequence[Item]) -> dict[str, np.ndarray]:
        batch = rows.rows_to_columns([row for row, _ in items])
        config = self.features.fbank
        labeled = [i for i, (_, waveform) in enumerate(items) if waveform is not None]
        if len(labeled) == len(items):
            batch[rows.FBANK] = self._fbank([waveform for _, waveform in items])
        else:
            # Rows without audio get an all-zero fbank that the classifier never looks at.
            fbank = np.zeros((len(items), config.max_length, config.num_mel_bins), self.numpy_dtype)
            if labeled:
                fbank[labeled] = self._fbank([items[i][1] for i in labeled])
            batch[rows.FBANK] = fbank
        return batch

    def _fbank(self, waveforms: list[np.ndarray]) -> np.ndarray:
        padded, lengths = pad_waveforms(waveforms)  # (B, N), (B,)
        with torch.inference_mode():
            fbank = compute_fbank(padded, lengths, self.features.fbank)  # (B, T, F) float32
        return fbank_to_numpy(fbank, self.features.dtype)


def _failure_row(unit: WorkUnit, reason: str) -> dict:
    row = rows.empty_row(unit.unit_id, unit.shard, "")
    row[rows.UNIT_FAILURE] = reason
    return row
