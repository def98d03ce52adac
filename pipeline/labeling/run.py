"""One labeling run: the whole flow of a clip, from the inputs to a committed Parquet row.

    plan      the inputs -> work units; what the output holds already is skipped  (driver)
    read      fetch, decode, window, fbank                           (Ray read tasks, read.py)
    classify  AST -> embedding, scores, top-k; rows staged as parts  (Ray actors, classify.py)
    commit    staged parts -> one unit file and its marker           (driver, output/commit.py)

`run_labeling` is that flow; graph.py holds the Ray Data graph of the read and classify stages
and the Ray settings it needs. The driver never imports torch: it checks the model from its
files' headers and the actors build it.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

import ray

from ast_model.checkpoint_files import CheckpointFiles, read_checkpoint
from ast_model.config import FbankConfig
from pipeline.cluster import init_ray
from pipeline.labeling.graph import ModelInObjectStore, Placement, labeling_graph
from pipeline.labeling.plan import WorkUnit, plan_work_units
from pipeline.labeling.summary import RunSummary, summarise
from pipeline.output.commit import CommitListener, CommitOutcome, Committer
from pipeline.output.index import write_index
from pipeline.output.layout import (
    OutputLocation,
    check_output_writable,
    write_labels_table,
    write_stats,
    write_summary,
)
from pipeline.output.resume import check_resume
from pipeline.output.schema import OutputSpec
from pipeline.settings import ReadSettings, RunConfig
from pipeline.storage import StorageError


class RunProgress(CommitListener, Protocol):
    """What the progress display hears of a run, beyond the commits."""

    def finish(self) -> None: ...


def run_labeling(
    config: RunConfig,
    echo: Callable[[str], None] = print,
    progress: Callable[[int], RunProgress] | None = None,
) -> RunSummary:
    """Labels the config's inputs into its output. `echo` takes one-line messages; `progress`
    makes the progress display for a number of units (None: none)."""
    started = time.monotonic()
    # Everything a user can get wrong is checked here, on the driver, before any Ray work starts.
    config.check()
    checkpoint = read_checkpoint(config.options.model)  # every weight checked; torch not loaded
    fbank = config.options.fbank_config(checkpoint.config)
    read = config.options.read_settings(fbank)
    plan = plan_work_units(
        config.inputs, config.manifest, config.files_per_unit, exclude=(config.output,)
    )
    location = OutputLocation.of(config.output)
    spec = output_spec(location, config, checkpoint, fbank, read)
    check_output_writable(location)
    planned = [(unit.unit_id, unit.sources) for unit in plan.units]
    resume = check_resume(location, planned, spec.model_fingerprint, config.overwrite)
    write_labels_table(location, spec.label_names)
    todo = [unit for unit in plan.units if unit.unit_id not in resume.committed]
    echo(
        f"{len(plan.units)} work units: {len(plan.units) - len(todo)} already committed, "
        f"{len(todo)} to label -> {config.output}"
    )

    committed, outcome = resume.units, CommitOutcome({}, {})
    if todo:
        outcome = _label_units(todo, config, checkpoint, fbank, read, spec, echo, progress)
        committed.update(outcome.committed)
        # Only a run that labeled units writes the index here. A rerun with nothing to label
        # reads each marker newer than the index; read_commit_markers rewrites the index itself
        # when more than INDEX_REFRESH_AFTER are, so a failed write costs a rerun that at most.
        _best_effort(echo, "the markers' index", write_index, location, committed.values())
    summary = summarise(config.output, plan.units, todo, committed, time.monotonic() - started)
    summary.units_failed = outcome.failed
    summary.inputs_skipped = plan.skipped
    _best_effort(echo, "summary.json", write_summary, location, summary.to_dict())
    return summary


def _label_units(
    units: list[WorkUnit],
    config: RunConfig,
    checkpoint: CheckpointFiles,
    fbank: FbankConfig,
    read: ReadSettings,
    spec: OutputSpec,
    echo: Callable[[str], None],
    make_progress: Callable[[int], RunProgress] | None,
) -> CommitOutcome:
    """read -> classify -> commit on Ray: every unit ends committed, or failed with a reason."""
    init_ray(config.address, verbose=config.verbose)
    options = config.options
    placement = Placement.for_resources(
        ray.cluster_resources(), options.device, config.classifier_actors, bool(config.address)
    )
    echo(placement.describe(options))
    dataset = labeling_graph(
        units,
        read,
        options.feature_settings(fbank, placement.use_gpu),
        options.classifier_settings(placement.use_gpu, placement.cpu_threads),
        ModelInObjectStore(ray.put(checkpoint)),
        spec,
        placement,
    )
    progress = make_progress(len(units)) if make_progress else None
    committer = Committer(
        spec,
        {unit.unit_id: unit.sources for unit in units},
        placement.commits_in_flight,
        listener=progress,
        in_driver=not placement.on_cluster,
    )
    outcome = committer.run(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    with contextlib.suppress(Exception):  # diagnostics only: never fail a finished run over them
        write_stats(spec.location, dataset.stats())
    if progress:
        progress.finish()
    return outcome


def output_spec(
    location: OutputLocation,
    config: RunConfig,
    checkpoint: CheckpointFiles,
    fbank: FbankConfig,
    read: ReadSettings,
) -> OutputSpec:
    """The run's output description: everything in it but the model's name and the package
    version decides the rows' numbers (its fingerprint must match to resume)."""
    model = checkpoint.config
    return OutputSpec(
        location=location,
        run_id=uuid.uuid4().hex[:12],
        hidden_size=model.hidden_size,
        num_labels=model.num_labels,
        file_metadata={
            "model": checkpoint.name,
            "weights_sha256": checkpoint.weights_sha256,
            "label_names": list(model.id2label),
            "multi_label": model.multi_label,
            "package_version": package_version(),
            "features": asdict(fbank),
            "window_s": read.window_s,
            "hop_s": read.hop_s,
            "top_k": config.options.top_k,
        },
    )


def package_version() -> str:
    try:
        return version("ast-label")
    except PackageNotFoundError:
        return "0+unknown"


def _best_effort(echo: Callable[[str], None], what: str, write: Callable, *args) -> None:
    """Writes a file that only describes the output (the markers stay the commit points): a store
    that fails it after the retries costs a note, not the run's result."""
    try:
        write(*args)
    except StorageError as error:
        echo(f"note: could not write {what} ({error}); a later run writes it again")
