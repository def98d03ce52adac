"""One labeling run: the whole flow of a clip, shard to committed Parquet row, in `run_labeling`."""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    Future,
    ThreadPoolExecutor,
)
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from ast_model.checkpoint import LoadedModel, load_checkpoint
from ast_model.features import FbankConfig
from pipeline import defaults
from pipeline.errors import UserError
from pipeline.options import LabelingOptions
from pipeline.output import (
    CommittedUnit,
    CommitTracker,
    CompletedUnit,
    OutputSpec,
    check_output_writable,
    check_resume,
    commit_unit,
    remove_staging,
    write_index,
    write_labels_table,
    write_stats,
    write_summary,
)
from pipeline.progress import Progress
from pipeline.rows import FEATURE_DTYPES
from pipeline.sources import WorkUnit, plan_work_units
from pipeline.stages import FeatureSettings, ReadSettings, StoredModel, feature_dtype
from pipeline.storage import StorageError, error_reason

# Commits are small (read the unit's parts, write one file). In flight at once: one per
# COMMIT_CPUS CPUs of the cluster (at least 2): enough to keep up with the stream, few enough that
# Ray reuses idle workers instead of starting a process (2 CPU-s of imports) per commit.
COMMIT_CPUS = 4
# Ray's CPU request of a read task on a cluster without GPUs (see _placement).
CPU_ONLY_READ_CPUS = 0.5
# Batches a GPU classifier actor works on at once (see _labeling_graph).
GPU_CALLS_PER_CLASSIFIER = 2
# Restarts of a classifier actor on a cluster (nodes come and go); none in local mode.
CLUSTER_ACTOR_RESTARTS = 3
# Reasons of units that did not commit shown in the summary (all are in summary.json).
MAX_FAILURES_SHOWN = 10


@dataclass(frozen=True)
class RunConfig:
    inputs: tuple[str, ...]
    output: str
    options: LabelingOptions = LabelingOptions()  # model, windows, batch, device, precision...
    manifest: str | None = None
    classifier_actors: int | None = None  # None: one per GPU, or one per 8 CPUs on CPU
    files_per_unit: int = defaults.FILES_PER_UNIT
    overwrite: bool = False
    address: str | None = None
    verbose: bool = False  # Ray's own logs and progress bars


@dataclass
class RunSummary:
    output: str
    shards: int = 0
    files: int = 0
    windows: int = 0
    errors: int = 0
    audio_hours: float = 0.0
    wall_s: float = 0.0
    clips_per_s: float = 0.0
    audio_hours_per_s: float = 0.0
    units_skipped: int = 0
    units_labeled: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)
    # unit id -> why it did not commit (storage faults): a rerun of the same command labels them
    units_failed: dict[str, str] = field(default_factory=dict)
    # input files that folders and globs listed but that are not inputs, by reason
    inputs_skipped: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.units_failed

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Placement:
    """How many of what run where: decided once from the cluster's resources."""

    use_gpu: bool
    cpus: int
    gpus: int
    classifier_actors: int
    batch_size: int
    cpu_threads: int | None  # torch threads of a CPU classifier (None on GPU)
    read_cpus: float  # Ray's CPU request of a read task


def package_version() -> str:
    try:
        return version("ast-label")
    except PackageNotFoundError:
        return "0+unknown"


def run_labeling(
    config: RunConfig,
    echo: Callable[[str], None] = print,
    progress: Callable[[int], Progress] | None = None,
) -> RunSummary:
    """Labels the config's inputs into its output. `echo` takes one-line messages; `progress`
    makes the progress display for a number of units (None: none)."""
    started = time.monotonic()
    options = config.options
    _check_run_options(config)
    # Everything a user can get wrong is checked here, on the driver, before any Ray work starts.
    loaded = load_checkpoint(options.model)
    fbank_config = options.fbank_config(loaded)
    read = options.read_settings(fbank_config)
    plan = plan_work_units(
        config.inputs, config.manifest, config.files_per_unit, exclude=(config.output,)
    )
    spec = _output_spec(config.output, options, loaded, fbank_config, read)
    check_output_writable(config.output)
    resume = check_resume(
        config.output,
        [(unit.unit_id, unit.sources) for unit in plan.units],
        spec.model_fingerprint,
        config.overwrite,
    )
    write_labels_table(config.output, spec.label_names)
    todo = [unit for unit in plan.units if unit.unit_id not in resume.committed]
    echo(
        f"{len(plan.units)} work units: {len(plan.units) - len(todo)} already committed, "
        f"{len(todo)} to label -> {config.output}"
    )
    committed = resume.units
    failed: dict[str, str] = {}
    if todo:
        labeled, failed = _label_units(
            todo, config, loaded, fbank_config, read, spec, echo, progress
        )
        committed.update(labeled)
        # Only a run that labeled units writes the index here. A rerun with nothing to label
        # reads each marker newer than the index; read_commit_markers rewrites the index itself
        # when more than INDEX_REFRESH_AFTER are, so a failed write costs a rerun that at most.
        _best_effort(echo, "the markers' index", write_index, config.output, committed.values())
    summary = _summarise(config.output, plan.units, todo, committed, time.monotonic() - started)
    summary.units_failed = failed
    summary.inputs_skipped = plan.skipped
    _best_effort(echo, "summary.json", write_summary, config.output, summary.to_dict())
    return summary


def _best_effort(echo: Callable[[str], None], what: str, write: Callable, *args) -> None:
    """Writes a file that only describes the output (the markers stay the commit points): a store
    that fails it after the retries costs a note, not the run's result."""
    try:
        write(*args)
    except StorageError as error:
        echo(f"note: could not write {what} ({error}); a later run writes it again")


def _label_units(
    units: list[WorkUnit],
    config: RunConfig,
    loaded: LoadedModel,
    fbank_config: FbankConfig,
    read: ReadSettings,
    spec: OutputSpec,
    echo: Callable[[str], None],
    make_progress: Callable[[int], Progress] | None,
) -> tuple[dict[str, CommittedUnit], dict[str, str]]:
    """Streams the units through the graph and commits each as soon as all its rows are staged.
    Returns (the units committed, unit id -> why it did not commit)."""
    import ray

    from pipeline.cluster import init_ray

    init_ray(config.address, verbose=config.verbose)
    placement = _placement(config)
    echo(
        f"Ray: {placement.cpus} CPUs, {placement.gpus} GPUs; {placement.classifier_actors} "
        f"classifier actors on {'GPU' if placement.use_gpu else 'CPU'}, batches of "
        f"{placement.batch_size}"
    )
    features = FeatureSettings(
        fbank_config,
        feature_dtype(config.options.precision, placement.use_gpu),
        placement.batch_size,
    )
    model = StoredModel(ray.put(loaded))
    dataset = _labeling_graph(units, read, features, model, spec, config, placement)

    progress = make_progress(len(units)) if make_progress else None
    committer = _Committer(
        spec,
        {unit.unit_id: unit.sources for unit in units},
        max(2, placement.cpus // COMMIT_CPUS),
        progress,
        in_driver=not config.address,
    )
    tracker = CommitTracker()
    for records in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for unit in tracker.add(records):
            committer.submit(unit)
        for unit_id, reason in tracker.new_failures():
            committer.note_failure(unit_id, reason)
        committer.collect(wait=False)
    committer.collect(wait=True)
    with contextlib.suppress(Exception):  # diagnostics only: never fail a finished run over them
        write_stats(config.output, dataset.stats())

    failed = committer.failed
    for unit_id, (rows, total) in tracker.pending.items():  # a bug, never the data: say so
        failed.setdefault(unit_id, f"only {rows} of {total or '?'} rows reached the writer")
    for unit in units:
        if unit.unit_id not in committer.committed:
            failed.setdefault(unit.unit_id, "no rows reached the writer")
    for unit_id in failed:
        remove_staging(config.output, unit_id)
    remove_staging(config.output, None)
    if progress:
        progress.finish()
    return committer.committed, failed


def _labeling_graph(units, read, features, model, spec, config, placement):
    """The Ray Data graph:

        WorkUnitSource    read tasks   fetch, decode, window, fbank (B, T, F) in the model's dtype
        ClassifyAndStage  actor pool   batched AST (GPU or CPU) -> embedding, scores, top-k,
                                       written as Parquet parts under .ast-label/staging/<unit>/

    The driver then commits each unit once all of its rows are staged (see _label_units).
    """
    import ray

    from pipeline.datasource import WorkUnitSource
    from pipeline.stages import ClassifyAndStage

    # Ray Data gathers a task's output into a block until it reaches target_max_block_size
    # (128 MiB): a whole read task's fbank would move as one late block. A target of one batch's
    # fbank makes every batch (its fbank plus the other columns) a block of its own: the stream
    # stays fine-grained and the classifier gets its batches as they are, without re-batching.
    batch_bytes = features.batch_rows * features.fbank.max_length * features.fbank.num_mel_bins
    batch_bytes *= np.dtype(FEATURE_DTYPES[features.dtype]).itemsize
    ray.data.DataContext.get_current().target_max_block_size = batch_bytes
    # With GPUs in the cluster the read tasks use Ray's default scheduling, which keeps them off
    # GPU nodes while others fit (Ray Data would otherwise spread them over all nodes).
    cpu_stage = {"scheduling_strategy": "DEFAULT"} if placement.use_gpu else {}
    source = WorkUnitSource(units, read, features, placement.cpus)
    dataset = ray.data.read_datasource(
        source,
        num_cpus=placement.read_cpus,
        # One output stream per read task: Ray would otherwise split the blocks (already the
        # classifier's batch size) to reach its own guess of the parallelism.
        override_num_blocks=source.read_task_count,
        **cpu_stage,
    )
    # On a GPU two batches in flight per actor: one computes while the other's parts go up to
    # the store. On a CPU the model's threads already fill the cores.
    calls = GPU_CALLS_PER_CLASSIFIER if placement.use_gpu else 1
    with warnings.catch_warnings():
        # max_restarts has no named parameter in Ray 2.60; passing it as a remote arg warns.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return dataset.map_batches(
            ClassifyAndStage,
            fn_constructor_args=(
                spec,
                model,
                # "auto" resolves in the actor: a node may advertise a GPU torch cannot use.
                config.options.device if placement.use_gpu else "cpu",
                config.options.precision,
                config.options.top_k,
                placement.cpu_threads,
            ),
            batch_size=features.batch_rows,
            batch_format="numpy",
            zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(
                size=placement.classifier_actors,
                max_concurrent_calls_per_actor=calls,
                enable_true_multi_threading=calls > 1,
            ),
            num_gpus=1 if placement.use_gpu else 0,
            num_cpus=1,
            # Ray Data restarts a dead actor forever by default, so a batch that kills its
            # process would loop. On a cluster a few restarts ride out lost (spot) nodes; on one
            # machine a dead actor is a crash that would recur: fail, and let the rerun resume.
            # (Any restart also makes Ray log an error-level line at every actor start.)
            max_restarts=CLUSTER_ACTOR_RESTARTS if config.address else 0,
        )


def _placement(config: RunConfig) -> Placement:
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    device = config.options.device
    # --device cuda on a cluster with no GPU node up yet asks the autoscaler for one.
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    # On CPU a model actor runs best with several threads: one actor per CPUS_PER_CPU_CLASSIFIER.
    per_actor = defaults.CPUS_PER_CPU_CLASSIFIER
    actors = config.classifier_actors or max(1, gpus if use_gpu else cpus // per_actor)
    threads = None if use_gpu else max(1, min(per_actor, cpus // actors))
    batch_size = config.options.batch_rows(use_gpu)
    # A read task keeps one core busy. Without GPUs the classifiers hold CPUs they use only as far
    # as the model is heavy; a read asking for half a CPU lets reads use what a light model leaves
    # (Ray Data's backpressure stops them from running ahead of a heavy one).
    read_cpus = 1.0 if use_gpu else CPU_ONLY_READ_CPUS
    return Placement(use_gpu, cpus, gpus, actors, batch_size, threads, read_cpus)


class _Committer:
    """Runs commit_unit while the stream goes on; keeps every unit's outcome.

    On a cluster the commits are small Ray tasks, spread over the nodes. On this machine alone
    (local mode) a few threads of the driver run them: a commit is mostly I/O and Parquet
    encoding (about 0.3 ms of CPU per clip), and a worker process of its own would cost more
    to start (2 CPU-s of imports) than all the commits of a run on a laptop.
    """

    def __init__(
        self,
        spec: OutputSpec,
        sources: dict[str, tuple[str, ...]],
        max_in_flight: int,
        progress: Progress | None,
        in_driver: bool,
    ):
        self.spec = spec
        self.sources = sources
        self.max_in_flight = max_in_flight
        self.progress = progress
        if in_driver:
            self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="commit")
            self._start = functools.partial(self._pool.submit, commit_unit)
        else:
            import ray

            self._pool = None
            task = ray.remote(num_cpus=0.25)(commit_unit)
            self._start = lambda *args: task.remote(*args).future()
        self.in_flight: dict[Future, str] = {}  # -> unit id
        self.committed: dict[str, CommittedUnit] = {}
        self.failed: dict[str, str] = {}

    def submit(self, unit: CompletedUnit) -> None:
        future = self._start(
            self.spec, unit.unit_id, self.sources[unit.unit_id], unit.part_uris, unit.rows
        )
        self.in_flight[future] = unit.unit_id
        while len(self.in_flight) >= self.max_in_flight:
            self._collect(timeout=None, every=False)

    def note_failure(self, unit_id: str, reason: str) -> None:
        self.failed.setdefault(unit_id, reason)
        if self.progress:
            self.progress.unit_failed()

    def collect(self, wait: bool) -> None:
        if self.in_flight:
            self._collect(timeout=None if wait else 0, every=wait)
        if self.progress:
            self.progress.tick()
        if wait and self._pool is not None:
            self._pool.shutdown()

    def _collect(self, timeout: float | None, every: bool) -> None:
        finished, _ = futures_wait(
            list(self.in_flight),
            timeout=timeout,
            return_when=ALL_COMPLETED if every else FIRST_COMPLETED,
        )
        for future in finished:
            unit_id = self.in_flight.pop(future)
            try:
                marker = future.result()
            except Exception as error:  # the store, after the retries; a lost worker
                cause = getattr(error, "cause", None) or error  # a Ray task's own exception
                self.note_failure(unit_id, f"commit failed: {error_reason(cause)}")
                continue
            unit = CommittedUnit.from_marker(marker)
            self.committed[unit_id] = unit
            if self.progress:
                self.progress.unit_committed(unit.files, unit.errors, unit.audio_seconds)


def _check_run_options(config: RunConfig) -> None:
    problems = []
    if not config.inputs and not config.manifest:
        problems.append("give at least one INPUT or --manifest")
    if config.classifier_actors is not None and config.classifier_actors < 1:
        problems.append("--classifier-actors must be at least 1")
    if problems:
        raise UserError("; ".join(problems))
    # On a cluster (--address) the autoscaler may still bring GPU nodes up; here it cannot.
    config.options.check(gpu_may_appear=bool(config.address))


def _output_spec(
    output: str,
    options: LabelingOptions,
    loaded: LoadedModel,
    fbank_config: FbankConfig,
    read: ReadSettings,
) -> OutputSpec:
    settings = {
        "features": asdict(fbank_config),
        "window_s": read.window_s,
        "hop_s": read.hop_s,
        "top_k": options.top_k,
    }
    return OutputSpec(
        output_uri=output,
        run_id=uuid.uuid4().hex[:12],
        hidden_size=loaded.config.hidden_size,
        num_labels=loaded.config.num_labels,
        file_metadata={
            "model": loaded.name,
            "weights_sha256": loaded.weights_sha256,
            "label_names": list(loaded.config.id2label),
            "multi_label": loaded.config.multi_label,
            "package_version": package_version(),
            **settings,
        },
    )


def _summarise(
    output: str,
    units: list[WorkUnit],
    todo: list[WorkUnit],
    committed: dict[str, CommittedUnit],
    wall_s: float,
) -> RunSummary:
    planned = [committed[unit.unit_id] for unit in units if unit.unit_id in committed]
    labeled_now = {unit.unit_id for unit in todo}
    summary = RunSummary(output=output, wall_s=round(wall_s, 3))
    summary.shards = len(planned)
    summary.units_skipped = len(units) - len(todo)
    files_now = 0
    seconds_now = 0.0
    for unit in planned:
        summary.files += unit.files
        summary.windows += unit.windows
        summary.errors += unit.errors
        summary.audio_hours += unit.audio_seconds / 3600.0
        for reason, count in unit.error_reasons.items():
            summary.error_reasons[reason] = summary.error_reasons.get(reason, 0) + count
        if unit.unit_id in labeled_now:
            summary.units_labeled += 1
            files_now += unit.files
            seconds_now += unit.audio_seconds
    if wall_s > 0:
        summary.clips_per_s = round(files_now / wall_s, 3)
        summary.audio_hours_per_s = round(seconds_now / 3600.0 / wall_s, 6)
    summary.audio_hours = round(summary.audio_hours, 6)
    return summary


def format_summary(summary: RunSummary) -> str:
    lines = [
        f"shards {summary.shards} ({summary.units_labeled} labeled now, "
        f"{summary.units_skipped} already done)",
        f"files {summary.files}, windows {summary.windows}, error rows {summary.errors}",
        f"audio {summary.audio_hours:.3f} h in {summary.wall_s:.1f} s: "
        f"{summary.clips_per_s:.1f} clips/s, {summary.audio_hours_per_s * 3600:.1f} audio-s/s",
        f"output {summary.output}",
    ]
    if summary.inputs_skipped:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(summary.inputs_skipped.items()))
        lines.append(f"skipped (not inputs): {skipped}")
    for reason, count in sorted(summary.error_reasons.items(), key=lambda item: -item[1])[:5]:
        lines.append(f"  error x{count}: {reason}")
    if summary.units_failed:
        lines.append(
            f"NOT COMMITTED: {len(summary.units_failed)} units (storage faults, not the data's); "
            "run the same command again to label them:"
        )
        for unit_id, reason in sorted(summary.units_failed.items())[:MAX_FAILURES_SHOWN]:
            lines.append(f"  {unit_id}: {reason}")
        if len(summary.units_failed) > MAX_FAILURES_SHOWN:
            lines.append(f"  ... and {len(summary.units_failed) - MAX_FAILURES_SHOWN} more")
    return "\n".join(lines)
