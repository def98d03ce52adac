"""`ast-label norm-stats`: a corpus's own fbank mean and std, for `ast-label run --norm-stats`.

Measured with Ray Data over the same inputs `ast-label run` takes, through the same read stage and
the same Ray datasource (pipeline.labeling.datasource), so the numbers describe exactly the
windows the model will see. The read tasks keep only a few sums of each batch: the fbank never
leaves them.

Definition: the population mean and std of every fbank value (128 mel bins) of every real frame of
every window. Each batch yields the count, sum and sum of squares (float64) of its values; the
driver adds them up, so the result does not depend on how the corpus is split.

The original AST repository's `get_norm_stats` differs on purpose: it takes the mean and std of
each padded (B, 1024, 128) training batch and averages them over batches. That counts the zero
padding past each clip's end (pulling the mean towards 0 and distorting the std by an amount that
depends on clip lengths) and averages stds instead of pooling variances. Clips shorter than
10.24 s therefore give different figures there than here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields

import numpy as np

from ast_model.config import FbankConfig
from pipeline import defaults, rows
from pipeline.cluster import init_ray
from pipeline.labeling.datasource import WorkUnitSource
from pipeline.labeling.plan import plan_work_units
from pipeline.normalisation import NormStats, NormStatsError
from pipeline.settings import FeatureSettings, ReadSettings
from pipeline.storage import StorageError

# With mean 0 and std 0.5, compute_fbank's normalisation (x - 0) / (2 * 0.5) is the identity:
# the raw log-mel values, from the one fbank implementation the pipeline uses.
RAW_FBANK = FbankConfig(mean=0.0, std=0.5)
# Windows per fbank batch of a read task: (16, 1024, 128) float32 is 8 MiB.
FBANK_BATCH = 16
# The column that carries a unit's storage fault out of its read task ("" when none). Raised in
# the task, it would reach the driver as Ray's task error: a bug's traceback instead of exit 3.
STORAGE_FAULT = "storage_fault"


@dataclass(frozen=True)
class FbankMoments:
    """Sums that combine exactly by addition: count, sum and sum of squares of fbank values."""

    values: int = 0
    total: float = 0.0  # float64 sum
    total_sq: float = 0.0  # float64 sum of squares
    frames: int = 0
    files: int = 0  # files decoded
    errors: int = 0  # files that could not be read or decoded (left out)

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


_MOMENT_FIELDS = tuple(field.name for field in fields(FbankMoments))


def batch_moments(batch: rows.Batch) -> dict[str, np.ndarray]:
    """A read stage batch (raw fbank) -> one row: its moments over the real frames of its windows
    (the padding left out), its files and errors, and the storage fault of a unit, if any."""
    fbank = batch[rows.FBANK]  # (B, T, F) float32: RAW_FBANK's values are the log-mel energies
    moments = FbankMoments()
    faults = [str(reason) for reason in batch[rows.UNIT_FAILURE] if reason]
    for row, frames in enumerate(batch[rows.FRAMES]):
        if batch[rows.ERROR][row]:
            moments += FbankMoments(errors=1)
        elif not batch[rows.UNIT_FAILURE][row]:
            real = fbank[row, :frames].astype(np.float64)  # (frames, F)
            moments += FbankMoments(
                values=real.size,
                total=float(real.sum()),
                total_sq=float(np.square(real).sum()),
                frames=int(frames),
                files=int(batch[rows.WINDOW_INDEX][row] == 0),
            )
    columns = {name: np.array([getattr(moments, name)]) for name in _MOMENT_FIELDS}
    columns[STORAGE_FAULT] = np.array([faults[0] if faults else ""], dtype=object)
    return columns


def compute_norm_stats(
    inputs: Sequence[str],
    manifest: str | None = None,
    files_per_unit: int = defaults.FILES_PER_UNIT,
    max_duration_s: float = defaults.MAX_DURATION_S,
    address: str | None = None,
    echo: Callable[[str], None] = print,
) -> NormStats:
    """Plans the inputs into work units as `run` does and measures them in parallel on Ray."""
    import ray

    units = plan_work_units(inputs, manifest, files_per_unit).units
    init_ray(address)
    echo(f"measuring fbank statistics of {len(units)} work units")
    window_s = RAW_FBANK.input_seconds  # the model's input, cut as `run` cuts it by default
    source = WorkUnitSource(
        units,
        ReadSettings(window_s, window_s, max_duration_s),
        FeatureSettings(RAW_FBANK, "float32", FBANK_BATCH),
        cpus=max(1, int(ray.cluster_resources().get("CPU", 1))),
        reduce=batch_moments,
    )
    dataset = ray.data.read_datasource(source, override_num_blocks=source.read_task_count)
    total, faults = FbankMoments(), []
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        faults += [str(fault) for fault in batch[STORAGE_FAULT] if fault]
        for row in range(len(batch[STORAGE_FAULT])):
            total += FbankMoments(*(batch[name][row].item() for name in _MOMENT_FIELDS))
    if faults:  # statistics of part of the corpus would be wrong: none, and a rerun reads it all
        raise StorageError(f"{len(faults)} of {len(units)} work units not read: {faults[0]}")
    return total.stats([*inputs, *([manifest] if manifest else [])])
