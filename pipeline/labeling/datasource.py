"""Work units as a Ray Data source: each read task runs the read stage over a slice of the plan.

Why not `ray.data.from_items(units)`: the driver puts every block (and every read task) in the
object store one by one before the first read starts; one block per unit took 37 s for 20,000
units. Here the read tasks are few, each holding a contiguous slice of the plan, and a read task
streams its units' batches as it goes. `run` and `norm-stats` both read through it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import rows
from pipeline.labeling.plan import WorkUnit
from pipeline.settings import FeatureSettings, ReadSettings

# Read tasks per CPU of the cluster: enough that the last tasks of a run are short, few enough
# that the driver's cost per task (one object-store put each) stays small at 100k units.
READ_TASKS_PER_CPU = 4
# ...and at most this many units in one read task: a task retried after a lost node redoes them.
MAX_UNITS_PER_READ_TASK = 100
# ...but no more tasks than one per this many input bytes: each read task's process imports torch
# (5 CPU-s with Ray's own start), the decode and fbank of about 500 ten-second clips (~100 MB of
# FLAC); a small run reads faster in one process than it starts a second.
MIN_BYTES_PER_READ_TASK = 128 * 2**20

# What a read task does with each batch of the read stage before it leaves the task: nothing
# (the classifier takes it), or a reduction (norm-stats keeps a few sums, never the fbank).
BatchReduction = Callable[[rows.Batch], dict[str, np.ndarray]]


def read_task_count(units: int, cpus: int, input_bytes: int = 0) -> int:
    """Read tasks for `units` work units on `cpus` CPUs; `input_bytes` (0: unknown) caps them."""
    count = min(units, max(READ_TASKS_PER_CPU * cpus, -(-units // MAX_UNITS_PER_READ_TASK)))
    if input_bytes:
        count = min(count, max(1, -(-input_bytes // MIN_BYTES_PER_READ_TASK)))
    return count


def read_units(
    units: tuple[WorkUnit, ...],
    read: ReadSettings,
    features: FeatureSettings,
    reduce: BatchReduction | None,
) -> Iterator[Block]:
    # Imported here, in the read task's process: the read stage loads torch, the driver never.
    from pipeline.labeling.read import ReadStage

    for batch in ReadStage(read, features).batches(units):
        yield BlockAccessor.batch_to_block(reduce(batch) if reduce else batch)


class WorkUnitSource(Datasource):
    def __init__(
        self,
        units: Sequence[WorkUnit],
        read: ReadSettings,
        features: FeatureSettings,
        cpus: int,
        reduce: BatchReduction | None = None,
        input_bytes: int = 0,
    ):
        super().__init__()
        self.units = tuple(units)
        self.read = read
        self.features = features
        self.cpus = cpus
        self.reduce = reduce
        self.input_bytes = input_bytes  # of the units' sources, as listed (0: unknown)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    @property
    def read_task_count(self) -> int:
        return read_task_count(len(self.units), self.cpus, self.input_bytes)

    def get_read_tasks(self, parallelism: int, **_ignored) -> list[ReadTask]:
        """Ray's `parallelism` guess knows nothing of units; the count comes from the plan."""
        count = self.read_task_count
        bounds = np.linspace(0, len(self.units), count + 1).round().astype(int)
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [
            ReadTask(
                functools.partial(
                    read_units, self.units[start:stop], self.read, self.features, self.reduce
                ),
                metadata,
            )
            for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
        ]
