"""`ast-label relabel`: an existing output scored by a head, from its stored embeddings alone.

No audio is read and no transformer runs: Ray Data read tasks take the source output's committed
unit files a slice at a time, add the head's columns to every row (every other column kept as it
is), and commit each unit into the new output exactly as a labeling run does (its unit file in
one atomic write, then its marker: output.commit.commit_table). A unit whose store failed is not
committed and a rerun of the same command relabels it; committed units are skipped. Its numbers
are `run --head`'s: the same head on the same float32 embeddings.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.cluster import init_ray
from pipeline.errors import Interrupted, UserError
from pipeline.heads.head import Head, load_head
from pipeline.labeling.run import NoProgress, RunProgress, interrupted, package_version
from pipeline.labeling.summary import RunSummary, summarise
from pipeline.output.commit import CommitOutcome, CommittedUnit, StagedCounts, commit_table
from pipeline.output.index import read_commit_markers, write_index
from pipeline.output.layout import (
    OutputLocation,
    check_output_writable,
    unit_id_of,
    write_head_labels_table,
    write_labels_table,
    write_summary,
)
from pipeline.output.reader import CommittedOutput, embedding_size, list_matrix, open_output
from pipeline.output.resume import check_resume
from pipeline.output.schema import HEAD_COLUMNS, OutputSpec, head_columns
from pipeline.storage import StorageError, error_reason, with_retries

# Unit files per read task: a few, so a retried task redoes little and the stream stays fine.
UNITS_PER_TASK = 4
# A relabel task's record of a unit: its marker as JSON, or why it did not commit ("" if it did).
MARKER = "marker"
FAILURE = "unit_failure"


@dataclass(frozen=True)
class RelabelConfig:
    source: str  # the output to read
    output: str  # the new output: every column of the source, and the head's
    head: str
    overwrite: bool = False
    address: str | None = None
    verbose: bool = False


@dataclass(frozen=True)
class SourceUnit:
    unit_id: str
    path: str  # the unit file, in the source output's filesystem
    sources: tuple[str, ...]  # its input URIs, from the source's marker


def relabel(
    config: RelabelConfig,
    echo: Callable[[str], None] = print,
    progress: RunProgress | None = None,
) -> RunSummary:
    """Scores every committed unit of the source with the head into the new output."""
    started = time.monotonic()
    progress = progress or NoProgress()
    progress.phase("reading the output and the head")
    source = open_output(config.source)
    head = load_head(config.head)
    hidden_size = embedding_size(source, "a head has nothing to read")
    head.check_base(source.metadata.get("weights_sha256", ""), hidden_size, source.uri)
    location = OutputLocation.of(config.output)
    if location == source.location:
        raise UserError(f"--output {config.output} is the output being relabeled: give a new one")
    spec = relabeled_spec(source, head, location)
    check_output_writable(location)
    units = _source_units(source)
    resume = check_resume(location, spec, config.overwrite)
    write_labels_table(location, spec.label_names)
    write_head_labels_table(location, head.label_names, head.thresholds.tolist())
    todo = [unit for unit in units if unit.unit_id not in resume.units]
    echo(
        f"{len(units)} unit files: {len(units) - len(todo)} already relabeled, "
        f"{len(todo)} to relabel -> {config.output}"
    )
    committed, outcome = dict(resume.units), CommitOutcome({}, {})
    if todo:
        outcome = _relabel_units(todo, source, spec, head, config, progress)
        committed.update(outcome.committed)
        write_index(location, committed.values())
    progress.finish()
    labeled_now = {unit.unit_id for unit in todo}
    wall_s = time.monotonic() - started
    summary = summarise(config.output, [u.unit_id for u in units], labeled_now, committed, wall_s)
    summary.units_failed = outcome.failed
    write_summary(location, summary.to_dict())
    return summary


def relabeled_spec(source: CommittedOutput, head: Head, location: OutputLocation) -> OutputSpec:
    """The new output's description: the source's (model, labels, features, windows) and the
    head's, so that resuming with another head, or another source, is refused."""
    described = {k: v for k, v in source.metadata.items() if k != "model_fingerprint"}
    described.update(
        head=head.describe(),
        head_name=head.name,
        package_version=package_version(),
        relabeled_from=source.location.uri,
    )
    return OutputSpec(
        location=location,
        run_id=uuid.uuid4().hex[:12],
        hidden_size=head.hidden_size,  # the source's: check_base made sure
        num_labels=len(source.label_names),
        file_metadata=described,
    )


def _source_units(source: CommittedOutput) -> list[SourceUnit]:
    """The source's committed unit files, with the inputs their markers list."""
    markers = read_commit_markers(source.location, refresh_index=False)  # the source is read only
    units = []
    for path in source.files:
        unit_id = unit_id_of(path)
        marker = markers.get(unit_id)
        units.append(SourceUnit(unit_id, path, marker.sources if marker else ()))
    return units


def _relabel_units(
    units: list[SourceUnit],
    source: CommittedOutput,
    spec: OutputSpec,
    head: Head,
    config: RelabelConfig,
    progress: RunProgress,
) -> CommitOutcome:
    """The units on Ray: each read task relabels and commits its slice of unit files."""
    progress.phase("starting Ray")
    init_ray(config.address, verbose=config.verbose)
    datasource = UnitFileSource(units, source.location, spec, head)
    dataset = ray.data.read_datasource(datasource, override_num_blocks=datasource.task_count)
    progress.start_labeling(len(units), tar_shards=False, files=None, input_bytes=0)
    outcome = CommitOutcome({}, {})
    try:
        for records in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            _take_records(records, outcome, progress)
    except KeyboardInterrupt:
        progress.finish()
        raise Interrupted(interrupted(outcome.committed, len(units), "relabeled")) from None
    for unit in units:  # a task lost without a record: say so, a rerun relabels it
        if unit.unit_id not in outcome.committed:
            outcome.failed.setdefault(unit.unit_id, "no record of it reached the driver")
    return outcome


def _take_records(records: dict, outcome: CommitOutcome, progress: RunProgress) -> None:
    for unit_id, marker, failure in zip(
        records["unit_id"], records[MARKER], records[FAILURE], strict=True
    ):
        if failure:
            outcome.failed[str(unit_id)] = str(failure)
            progress.unit_failed(str(unit_id), str(failure))
            continue
        unit = CommittedUnit.from_marker(json.loads(marker))
        outcome.committed[unit.unit_id] = unit
        progress.rows_staged(
            StagedCounts(unit.files, unit.windows, unit.errors, unit.audio_seconds)
        )
        progress.unit_committed(unit)


class UnitFileSource(Datasource):
    """A source output's unit files as a Ray Data source: each read task relabels a slice of them
    and yields one record per unit (its marker's counts, or why it did not commit)."""

    def __init__(
        self, units: Sequence[SourceUnit], source: OutputLocation, spec: OutputSpec, head: Head
    ):
        super().__init__()
        self.units = tuple(units)
        self.source = source
        self.spec = spec
        self.head = head

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    @property
    def task_count(self) -> int:
        return max(1, -(-len(self.units) // UNITS_PER_TASK))

    def get_read_tasks(self, parallelism: int, **_ignored) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        slices = [
            self.units[i : i + UNITS_PER_TASK] for i in range(0, len(self.units), UNITS_PER_TASK)
        ]
        return [
            ReadTask(
                functools.partial(relabel_units, chunk, self.source, self.spec, self.head),
                metadata,
            )
            for chunk in slices
        ]


def relabel_units(
    units: tuple[SourceUnit, ...], source: OutputLocation, spec: OutputSpec, head: Head
) -> Iterator[Block]:
    """A read task's work: each unit file read whole, scored, committed; one record per unit:
    its marker as JSON, or why it did not commit."""
    for unit in units:
        marker, failure = "", ""
        try:
            table = _relabeled(unit, source, spec, head)
            marker = json.dumps(commit_table(spec, unit.unit_id, unit.sources, table))
        except StorageError as error:
            failure = str(error)
        except Exception as error:  # a bug must not take the other units down with it
            failure = f"internal error: {error_reason(error)}"
        record = {"unit_id": [unit.unit_id], MARKER: [marker], FAILURE: [failure]}
        yield BlockAccessor.batch_to_block(
            {k: np.array(v, dtype=object) for k, v in record.items()}
        )


def _relabeled(unit: SourceUnit, source: OutputLocation, spec: OutputSpec, head: Head) -> pa.Table:
    """The unit's rows with the head's columns (replacing a head's of an earlier relabel)."""
    fs = source.fs
    table = with_retries(
        lambda: pq.read_table(unit.path, filesystem=fs), f"cannot read {source.uri_of(unit.path)}"
    )
    labeled = np.asarray(table["error"].is_null())  # (N,)
    matrix = list_matrix(table["embedding"], head.hidden_size)  # (N, D), error rows masked
    scores = np.zeros((len(matrix), head.num_labels), dtype=np.float32)
    scores[labeled] = head.scores(matrix[labeled])
    added = head_columns(scores, ~labeled, spec)
    kept = {name: table[name] for name in table.column_names if name not in HEAD_COLUMNS}
    return pa.table(
        {name: kept.get(name, added.get(name)) for name in spec.schema.names}, schema=spec.schema
    )
