"""One labeling run: the whole flow of a clip, from the inputs to a committed Parquet row.

    plan      the inputs -> work units; what the output holds already is not planned (driver)
    read      fetch, decode, window, fbank                           (Ray read tasks, read.py)
    classify  AST -> embedding, scores, top-k; rows staged as parts  (Ray actors, classify.py)
    commit    staged parts -> one unit file and its marker           (driver, output/commit.py)

`run_labeling` is that flow; graph.py holds the Ray Data graph of the read and classify stages
and the Ray settings it needs. The driver never imports torch: it checks the model from its
files' headers and the actors build it.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

import ray

from ast_model.checkpoint_files import CheckpointError, CheckpointFiles, read_checkpoint
from ast_model.config import FbankConfig
from pipeline.cluster import init_ray, is_a_cluster
from pipeline.errors import Interrupted
from pipeline.heads.head import Head, load_head
from pipeline.labeling.graph import ModelInObjectStore, Placement, labeling_graph
from pipeline.labeling.inputs import expand_inputs
from pipeline.labeling.plan import Plan, group_work_units
from pipeline.labeling.summary import RunSummary, plural, summarise
from pipeline.output.commit import CommitListener, CommitOutcome, CommittedUnit, Committer
from pipeline.output.index import write_index
from pipeline.output.layout import (
    OutputLocation,
    check_output_writable,
    write_head_labels_table,
    write_labels_table,
    write_stats,
    write_summary,
)
from pipeline.output.resume import check_resume
from pipeline.output.schema import OutputSpec
from pipeline.settings import ReadSettings, RunConfig
from pipeline.storage import StorageError


class RunProgress(CommitListener, Protocol):
    """The progress display: the phase a run is in, then what its units do (CommitListener)."""

    def phase(self, text: str) -> None: ...

    def start_labeling(
        self, units: int, tar_shards: bool, files: int | None, input_bytes: int
    ) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    """A RunProgress that shows nothing (library use, tests)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def run_labeling(
    config: RunConfig,
    echo: Callable[[str], None] = print,
    progress: RunProgress | None = None,
) -> RunSummary:
    """Labels the inputs that the output does not hold yet. `echo` takes one-line messages;
    `progress` shows where the run is."""
    started = time.monotonic()
    progress = progress or NoProgress()
    # Everything a user can get wrong is checked here, on the driver, before any Ray work starts.
    config.check()
    progress.phase("checking the model")
    checkpoint = read_checkpoint(config.options.model)  # every weight checked; torch not loaded
    head = _checked_head(config.options.head, checkpoint)
    fbank = config.options.fbank_config(checkpoint.config)
    read = config.options.read_settings(fbank)
    progress.phase("planning the inputs")
    found = expand_inputs(config.inputs, config.manifest, exclude=(config.output,))
    progress.phase(f"checking the output ({plural(len(found.uris), 'input')})")
    location = OutputLocation.of(config.output)
    spec = output_spec(location, config, checkpoint, head, fbank, read)
    check_output_writable(location)
    resume = check_resume(location, spec, config.overwrite)
    plan = group_work_units(found, config.files_per_unit, labeled=resume.sources)
    write_labels_table(location, spec.label_names)
    if head is not None:
        write_head_labels_table(location, head.label_names, head.thresholds.tolist())
    gone = len(resume.sources - plan.inputs)
    echo(_plan_line(plan, gone, config.output))

    committed, outcome = dict(resume.units), CommitOutcome({}, {})
    if plan.units:
        outcome = _label_units(plan, config, checkpoint, head, fbank, read, spec, echo, progress)
        committed.update(outcome.committed)
        # Only a run that labeled units writes the index here. A rerun with nothing to label
        # reads each marker newer than the index; read_commit_markers rewrites the index itself
        # when more than INDEX_REFRESH_AFTER are, so a failed write costs a rerun that at most.
        _best_effort(echo, "the markers' index", write_index, location, committed.values())
    progress.finish()
    labeled_now = {unit.unit_id for unit in plan.units}
    wall_s = time.monotonic() - started
    summary = summarise(config.output, sorted(committed), labeled_now, committed, wall_s)
    summary.units_failed = outcome.failed
    summary.inputs_skipped = plan.skipped
    summary.inputs, summary.tar_inputs = len(plan.inputs), plan.tar_inputs
    summary.already_labeled, summary.new_inputs, summary.gone = (
        plan.already_labeled,
        plan.new_inputs,
        gone,
    )
    _best_effort(echo, "summary.json", write_summary, location, summary.to_dict())
    return summary


def _plan_line(plan: Plan, gone: int, output: str) -> str:
    inputs = "tar shard" if plan.tar_inputs else "input"
    units = plural(len(plan.units), "work unit")
    said = f"{plural(len(plan.inputs), inputs)}: {plan.already_labeled} labeled already, "
    said += f"{plan.new_inputs} new ({units} to label)"
    if gone:
        said += f", {gone} no longer in the input (their rows stay)"
    return f"{said} -> {output}"


def _label_units(
    plan: Plan,
    config: RunConfig,
    checkpoint: CheckpointFiles,
    head: Head | None,
    fbank: FbankConfig,
    read: ReadSettings,
    spec: OutputSpec,
    echo: Callable[[str], None],
    progress: RunProgress,
) -> CommitOutcome:
    """read -> classify -> commit on Ray: every unit ends committed, or failed with a reason."""
    progress.phase("starting Ray")
    init_ray(config.address, verbose=config.verbose)
    options = config.options
    placement = Placement.for_resources(
        ray.cluster_resources(),
        options.device,
        config.classifier_actors,
        is_a_cluster(config.address),
    )
    echo(placement.describe(options))
    progress.phase("loading the model")
    dataset = labeling_graph(
        plan.units,
        plan.input_bytes,
        read,
        options.feature_settings(fbank, placement.use_gpu),
        options.classifier_settings(placement.use_gpu, placement.cpu_threads),
        ModelInObjectStore(ray.put(checkpoint)),
        head,
        spec,
        placement,
    )
    files = sum(len(unit.sources) for unit in plan.units if unit.kind == "files")
    tar_shards = all(unit.kind == "tar" for unit in plan.units)
    progress.start_labeling(
        len(plan.units), tar_shards, None if tar_shards else files, plan.input_bytes
    )
    committer = Committer(
        spec,
        {unit.unit_id: unit.sources for unit in plan.units},
        placement.commits_in_flight,
        listener=progress,
        in_driver=not placement.on_cluster,
    )
    try:
        outcome = committer.run(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    except KeyboardInterrupt:
        progress.finish()
        raise Interrupted(interrupted(committer.committed, len(plan.units), "labeled")) from None
    except Exception as error:
        # An actor that could not build the checked model (its body damaged past what the
        # headers showed): Ray reports its constructor's error; say it in one line.
        found = re.search(r"CheckpointError: (.+)", str(error))
        if found is None:
            raise
        raise CheckpointError(f"a classifier actor {found.group(1).strip()}") from None
    with contextlib.suppress(Exception):  # diagnostics only: never fail a finished run over them
        write_stats(spec.location, dataset.stats())
    return outcome


def _checked_head(uri: str | None, checkpoint: CheckpointFiles) -> Head | None:
    """The --head, loaded and checked against the model (HeadError: trained on another one)."""
    if uri is None:
        return None
    head = load_head(uri)
    where = f"model {checkpoint.name}"
    head.check_base(checkpoint.weights_sha256, checkpoint.config.hidden_size, where)
    return head


def output_spec(
    location: OutputLocation,
    config: RunConfig,
    checkpoint: CheckpointFiles,
    head: Head | None,
    fbank: FbankConfig,
    read: ReadSettings,
) -> OutputSpec:
    """The run's output description: everything in it but the model's and head's paths and the
    package version decides the rows' numbers (its fingerprint must match to resume)."""
    model = checkpoint.config
    with_head = {"head": head.describe(), "head_name": head.name} if head is not None else {}
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
            **with_head,
        },
    )


def interrupted(committed: Mapping[str, CommittedUnit], units: int, done: str) -> str:
    """What an interrupted run kept, and how to go on."""
    files = sum(unit.files for unit in committed.values())
    return (
        f"interrupted: {len(committed)} of {plural(units, 'work unit')} {done} and committed "
        f"({plural(files, 'file')}) are kept, the rest is not in the output yet; run the same "
        "command again to go on from there"
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
