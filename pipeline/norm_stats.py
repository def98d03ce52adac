"""A corpus's own fbank mean and std, for `ast-label run --norm-stats FILE`.

AST normalises its input as (fbank - mean) / (2 * std) with AudioSet's statistics; its
documentation advises using the dataset's own statistics when the audio differs from AudioSet.
This computes them with Ray Data over the same inputs `ast-label run` takes, through the same
read -> decode -> window path, so the numbers describe exactly the windows the model will see.

Definition: the population mean and std of every fbank value (128 mel bins) of every real frame of
every window. Each unit's task returns the count, sum and sum of squares (float64) of its values;
the driver adds them up, so the result does not depend on how the corpus is split.

The original AST repository's `get_norm_stats` differs on purpose: it takes the mean and std of
each padded (B, 1024, 128) training batch and averages them over batches. That counts the zero
padding past each clip's end (pulling the mean towards 0 and distorting the std by an amount that
depends on clip lengths) and averages stds instead of pooling variances. Clips shorter than
10.24 s therefore give different figures there than here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, astuple, dataclass, fields
from typing import TypeVar

import numpy as np
import torch

from ast_model.features import FbankConfig, compute_fbank, num_fbank_frames, pad_waveforms
from pipeline import defaults
from pipeline.audio import AudioError, cut_windows, decode_audio
from pipeline.cluster import init_ray
from pipeline.errors import UserError
from pipeline.sources import WorkUnit, plan_work_units, read_unit_members
from pipeline.storage import StorageError, error_reason, filesystem_for, is_local, with_retries

# With mean 0 and std 0.5, compute_fbank's normalisation (x - 0) / (2 * 0.5) is the identity:
# the raw log-mel values, from the one fbank implementation the pipeline uses.
RAW_FBANK = FbankConfig(mean=0.0, std=0.5)
WINDOW_S = RAW_FBANK.max_length * RAW_FBANK.frame_shift_ms / 1000.0  # 10.24 s, the model's input
# Windows per compute_fbank call: (16, 1024, 128) float32 is 8 MiB.
FBANK_BATCH = 16

T = TypeVar("T")


class NormStatsError(UserError):
    """A norm stats file that cannot be read or used, or a corpus with nothing to measure."""


@dataclass(frozen=True)
class NormStats:
    mean: float
    std: float
    frames: int = 0  # real fbank frames measured
    files: int = 0  # files decoded
    errors: int = 0  # files that could not be read or decoded (left out)
    source: tuple[str, ...] = ()  # the inputs as given, then the manifest if any
    num_mel_bins: int = RAW_FBANK.num_mel_bins

    def to_dict(self) -> dict:
        return {**asdict(self), "source": list(self.source)}

    def save(self, uri: str) -> None:
        """Writes the JSON to a local path or an object-store URI (one PUT)."""
        fs, path = filesystem_for(uri)
        if is_local(uri):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError as error:  # a file in the way
                raise NormStatsError(f"cannot write {uri}: {error_reason(error)}") from None
        data = (json.dumps(self.to_dict(), indent=2) + "\n").encode()
        _stats_file_call(lambda: fs.pipe_file(path, data), f"cannot write {uri}")

    @classmethod
    def load(cls, uri: str) -> NormStats:
        fs, path = filesystem_for(uri)
        text = _stats_file_call(lambda: fs.cat_file(path), f"cannot read norm stats file {uri}")
        try:
            data = json.loads(text)
        except ValueError:  # UnicodeDecodeError included
            raise NormStatsError(f"{uri} is not JSON; expected the output of norm-stats") from None
        try:
            stats = cls(
                mean=float(data["mean"]),
                std=float(data["std"]),
                frames=int(data.get("frames", 0)),
                files=int(data.get("files", 0)),
                errors=int(data.get("errors", 0)),
                source=tuple(str(item) for item in data.get("source", ())),
                num_mel_bins=int(data.get("num_mel_bins", RAW_FBANK.num_mel_bins)),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise NormStatsError(
                f'{uri} is not a norm stats file: expected JSON with numbers "mean" and "std"'
            ) from None
        if not (math.isfinite(stats.mean) and math.isfinite(stats.std) and stats.std > 0):
            raise NormStatsError(
                f"{uri}: mean must be finite and std positive, got {stats.mean}, {stats.std}"
            )
        return stats


# Failures of the stats file's read or write that the user can fix (the path, permissions).
_USER_FIXABLE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _stats_file_call(call: Callable[[], T], what: str) -> T:
    """A read or write of a stats file, retried as every storage call is. What the user can fix
    is a NormStatsError (exit 2); a store that keeps failing stays a StorageError (exit 3: run the
    same command again)."""
    try:
        return with_retries(call, what)
    except StorageError as error:
        if isinstance(error.__cause__, _USER_FIXABLE):
            raise NormStatsError(str(error)) from None
        raise


@dataclass(frozen=True)
class FbankMoments:
    """Sums that combine exactly by addition: count, sum and sum of squares of fbank values."""

    values: int = 0
    total: float = 0.0  # float64 sum
    total_sq: float = 0.0  # float64 sum of squares
    frames: int = 0
    files: int = 0
    errors: int = 0

    def __add__(self, other: FbankMoments) -> FbankMoments:
        return FbankMoments(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def stats(self, source: Sequence[str]) -> NormStats:
        if self.values == 0:
            raise NormStatsError(
                f"no audio frames in the inputs ({self.files} files decoded, {self.errors} "
                "unreadable): nothing to compute statistics from"
            )
        mean = self.total / self.values
        # E[x^2] - mean^2 in float64: log-mel values have |mean| of a few units and a std of the
        # same order, so there is no catastrophic cancellation at any corpus size.
        std = math.sqrt(max(self.total_sq / self.values - mean * mean, 0.0))
        if std == 0.0:
            raise NormStatsError("every fbank value is the same (silent corpus?): std is 0")
        return NormStats(mean, std, self.frames, self.files, self.errors, tuple(source))


@dataclass(frozen=True)
class ReadLimits:
    max_member_bytes: int = defaults.MAX_MEMBER_BYTES
    max_duration_s: float = defaults.MAX_DURATION_S


def clip_moments(waveform: np.ndarray) -> FbankMoments:
    """(N,) float32 16 kHz -> the moments of its windows' real fbank frames (no padding)."""
    windows = cut_windows(waveform, WINDOW_S)
    moments = FbankMoments(files=1)
    for start in range(0, len(windows), FBANK_BATCH):
        chunk = windows[start : start + FBANK_BATCH]
        padded, lengths = pad_waveforms([window.waveform for window in chunk])  # (B, N), (B,)
        with torch.inference_mode():
            fbank = compute_fbank(padded, lengths, RAW_FBANK)  # (B, T, F)
        for row, length in enumerate(lengths.tolist()):
            frames = min(num_fbank_frames(length, RAW_FBANK), RAW_FBANK.max_length)
            real = fbank[row, :frames].double()  # (frames, F): the padding rows left out
            moments += FbankMoments(
                values=real.numel(),
                total=real.sum().item(),
                total_sq=real.square().sum().item(),
                frames=frames,
            )
    return moments


def unit_moments(unit: WorkUnit, limits: ReadLimits) -> FbankMoments:
    """One work unit's moments; unreadable or undecodable files are counted as errors."""
    moments = FbankMoments()
    for member in read_unit_members(unit, limits.max_member_bytes):
        if member.error is not None or member.audio is None:
            moments += FbankMoments(errors=1)
            continue
        try:
            decoded = decode_audio(member.audio, member.audio_format, limits.max_duration_s)
        except AudioError:
            moments += FbankMoments(errors=1)
            continue
        moments += clip_moments(decoded.waveform)
    return moments


_MOMENT_FIELDS = tuple(field.name for field in fields(FbankMoments))
# The column that carries a unit's StorageError out of its task ("" when none). Raised in the
# task, it would reach the driver as Ray's task error: a bug's traceback instead of exit 3.
_STORAGE_ERROR = "storage_error"


def _moments_batch(batch: dict[str, np.ndarray], limits: ReadLimits) -> dict[str, np.ndarray]:
    """Ray Data UDF: rows of serialised work units -> one row of moments per unit, and the
    store's fault that stopped the unit, if one did."""
    moments, faults = [], []
    for text in batch["unit"]:
        try:
            moments.append(unit_moments(WorkUnit.from_json(str(text)), limits))
            faults.append("")
        except StorageError as error:
            moments.append(FbankMoments())
            faults.append(str(error))
    columns = {name: np.array([getattr(m, name) for m in moments]) for name in _MOMENT_FIELDS}
    columns[_STORAGE_ERROR] = np.array(faults, dtype=object)
    return columns


def compute_norm_stats(
    inputs: Sequence[str],
    manifest: str | None = None,
    files_per_unit: int = defaults.FILES_PER_UNIT,
    limits: ReadLimits | None = None,
    address: str | None = None,
    echo: Callable[[str], None] = print,
) -> NormStats:
    """Plans the inputs into work units and measures them in parallel with Ray Data."""
    import ray

    units = plan_work_units(inputs, manifest, files_per_unit).units
    init_ray(address)
    echo(f"measuring fbank statistics of {len(units)} work units")
    rows = [{"unit": unit.to_json()} for unit in units]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    # One task per unit; its result is six numbers, so collecting them all on the driver is cheap.
    results = dataset.map_batches(
        _moments_batch, batch_size=1, fn_kwargs={"limits": limits or ReadLimits()}
    ).take_all()
    faults = [str(row[_STORAGE_ERROR]) for row in results if row[_STORAGE_ERROR]]
    if faults:  # statistics of part of the corpus would be wrong: none, and a rerun reads it all
        raise StorageError(f"{len(faults)} of {len(units)} work units not read: {faults[0]}")
    total = FbankMoments()
    for row in results:
        total += FbankMoments(
            values=int(row["values"]),
            total=float(row["total"]),
            total_sq=float(row["total_sq"]),
            frames=int(row["frames"]),
            files=int(row["files"]),
            errors=int(row["errors"]),
        )
    return total.stats([*inputs, *([manifest] if manifest else [])])
