"""One labeling run: the whole flow of a clip, shard to committed Parquet row, in `run_labeling`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version

import torch

from ast_model.checkpoint import DEFAULT_MODEL, LoadedModel, load_checkpoint
from ast_model.features import FbankConfig
from pipeline.cluster import init_ray
from pipeline.errors import UserError
from pipeline.output import (
    CommitTracker,
    CompletedUnit,
    OutputSpec,
    check_resume,
    commit_unit,
    read_commit_markers,
    write_staging_parts,
    write_summary,
)
from pipeline.sources import WorkUnit, plan_work_units
from pipeline.stages import Classify, Featurize, ReadSettings, read_units

# Commits are small tasks (read the unit's parts, write one file); bound how many wait at once.
MAX_COMMITS_IN_FLIGHT = 16
# Rows per staging part: bigger parts mean fewer small objects to merge at commit time.
WRITE_BATCH_ROWS = 256


@dataclass(frozen=True)
class RunConfig:
    inputs: tuple[str, ...]
    output: str
    model: str = DEFAULT_MODEL
    manifest: str | None = None
    batch_size: int | None = None  # None: 64 windows on GPU, 16 on CPU
    feature_actors: int | None = None  # None: sized from the cluster
    classifier_actors: int | None = None  # None: one per GPU, or one on a CPU-only cluster
    device: str = "auto"
    precision: str = "auto"
    window_s: float | None = None  # None: the model's input length (10.24 s for 1024 frames)
    hop_s: float | None = None  # None: equal to the window, no overlap
    top_k: int = 5
    max_duration_s: float = 3600.0
    max_member_bytes: int = 2 * 1024**3
    files_per_unit: int = 256
    norm_stats: str | None = None
    overwrite: bool = False
    address: str | None = None


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

    def to_dict(self) -> dict:
        return asdict(self)


def package_version() -> str:
    try:
        return version("ast-label")
    except PackageNotFoundError:
        return "0+unknown"


def run_labeling(config: RunConfig, echo: Callable[[str], None] = print) -> RunSummary:
    started = time.monotonic()
    _check_options(config)
    # Everything a user can get wrong is checked here, on the driver, before any Ray work starts.
    loaded = load_checkpoint(config.model)
    fbank_config = _fbank_config(loaded, config.norm_stats)
    window_s, hop_s = _window_settings(config, fbank_config)
    units = plan_work_units(config.inputs, config.manifest, config.files_per_unit)
    spec = _output_spec(config, loaded, fbank_config, window_s, hop_s)
    committed = check_resume(
        config.output,
        [(unit.unit_id, unit.sources) for unit in units],
        spec.model_fingerprint,
        config.overwrite,
    )
    todo = [unit for unit in units if unit.unit_id not in committed]
    echo(
        f"{len(units)} work units: {len(units) - len(todo)} already committed, "
        f"{len(todo)} to label -> {config.output}"
    )
    if todo:
        settings = ReadSettings(window_s, hop_s, config.max_duration_s, config.max_member_bytes)
        _label_units(todo, config, loaded, fbank_config, settings, spec, echo)
    markers = read_commit_markers(config.output)
    missing = {unit.unit_id for unit in todo} - set(markers)
    if missing:
        # Every row reached the writer or the stream would have failed; this is a bug, never data.
        raise RuntimeError(f"{len(missing)} work units did not commit: {sorted(missing)[:5]}")
    summary = _summarise(config.output, units, todo, markers, time.monotonic() - started)
    write_summary(config.output, summary.to_dict())
    return summary


def _label_units(
    units: list[WorkUnit],
    config: RunConfig,
    loaded: LoadedModel,
    fbank_config: FbankConfig,
    settings: ReadSettings,
    spec: OutputSpec,
    echo: Callable[[str], None],
) -> None:
    """The Ray Data graph: read -> featurize (CPU actors) -> classify (GPU/CPU actors) -> stage
    parts; the driver commits each unit once all of its rows are staged."""
    import ray

    init_ray(config.address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # --device cuda on a cluster with no GPU node up yet asks the autoscaler for one.
    use_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0)
    # Ray Data spreads actor pools over all nodes; with GPUs in the cluster the CPU stages use
    # Ray's default scheduling instead, which keeps CPU-only work off GPU nodes while others fit.
    cpu_stage_args = {"scheduling_strategy": "DEFAULT"} if use_gpu else {}
    feature_actors = config.feature_actors or max(1, cpus // 4)
    # On CPU a model actor runs best with several threads: one actor per 8 CPUs.
    classifier_actors = config.classifier_actors or max(1, gpus if use_gpu else cpus // 8)
    batch_size = config.batch_size or (64 if use_gpu else 16)
    echo(
        f"Ray: {cpus} CPUs, {gpus} GPUs; {feature_actors} feature actors, "
        f"{classifier_actors} classifier actors on {'GPU' if use_gpu else 'CPU'}"
    )
    model_ref = ray.put(loaded)

    dataset = ray.data.from_items(
        [{"unit": unit.to_json()} for unit in units], override_num_blocks=len(units)
    )
    # One task per work unit streams its members; small CPU share so reads overlap with actors.
    dataset = dataset.map_batches(
        read_units, batch_size=1, fn_kwargs={"settings": settings}, num_cpus=0.25, **cpu_stage_args
    )
    dataset = dataset.map_batches(
        Featurize,
        fn_constructor_args=(fbank_config,),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=feature_actors),
        num_cpus=0.5,
        **cpu_stage_args,
    )
    dataset = dataset.map_batches(
        Classify,
        fn_constructor_args=(
            model_ref,
            # "auto" resolves in the actor: a node may advertise a GPU that torch cannot use.
            config.device if use_gpu else "cpu",
            config.precision,
            config.top_k,
            None if use_gpu else max(1, min(8, cpus // classifier_actors)),
        ),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=classifier_actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    dataset = dataset.map_batches(
        write_staging_parts,
        fn_kwargs={"spec": spec},
        batch_size=WRITE_BATCH_ROWS,
        num_cpus=0.25,
        **cpu_stage_args,
    )

    committer = _Committer(spec, {unit.unit_id: unit.sources for unit in units}, echo)
    tracker = CommitTracker()
    for records in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for unit in tracker.add(records):
            committer.submit(unit)
        committer.report_finished()
    committer.wait_all()


class _Committer:
    """Runs commit_unit as small Ray tasks while the stream goes on, and reports each commit."""

    def __init__(
        self, spec: OutputSpec, sources: dict[str, tuple[str, ...]], echo: Callable[[str], None]
    ):
        import ray

        self.spec = spec
        self.sources = sources
        self.echo = echo
        self.task = ray.remote(num_cpus=0.25)(commit_unit)
        self.in_flight: list = []
        self.done = 0

    def submit(self, unit: CompletedUnit) -> None:
        self.in_flight.append(
            self.task.remote(
                self.spec, unit.unit_id, self.sources[unit.unit_id], unit.part_uris, unit.rows
            )
        )
        while len(self.in_flight) > MAX_COMMITS_IN_FLIGHT:
            self._report(num_returns=1, timeout=None)

    def report_finished(self) -> None:
        if self.in_flight:
            self._report(num_returns=len(self.in_flight), timeout=0)

    def wait_all(self) -> None:
        if self.in_flight:
            self._report(num_returns=len(self.in_flight), timeout=None)

    def _report(self, num_returns: int, timeout: float | None) -> None:
        import ray

        finished, self.in_flight = ray.wait(
            self.in_flight, num_returns=num_returns, timeout=timeout
        )
        for marker in ray.get(finished):
            self.done += 1
            self.echo(
                f"committed {self.done}/{len(self.sources)} {marker['unit_id']}: "
                f"{marker['files']} files, "
                f"{marker['windows']} windows, {marker['errors']} errors"
            )


def _check_options(config: RunConfig) -> None:
    problems = []
    if not config.inputs and not config.manifest:
        problems.append("give at least one INPUT or --manifest")
    if config.batch_size is not None and config.batch_size < 1:
        problems.append("--batch-size must be at least 1")
    if config.top_k < 1:
        problems.append("--top-k must be at least 1")
    for name, value in (("--window-s", config.window_s), ("--hop-s", config.hop_s)):
        if value is not None and value <= 0:
            problems.append(f"{name} must be positive")
    for name, value in (
        ("--feature-actors", config.feature_actors),
        ("--classifier-actors", config.classifier_actors),
    ):
        if value is not None and value < 1:
            problems.append(f"{name} must be at least 1")
    if config.device not in ("auto", "cpu", "cuda"):
        problems.append("--device must be auto, cpu or cuda")
    elif config.device == "cuda" and not config.address and not torch.cuda.is_available():
        # On a cluster (--address) the autoscaler may still bring GPU nodes up; here it cannot.
        problems.append("--device cuda: this machine has no usable GPU; use --device cpu or auto")
    if config.precision not in ("auto", "fp32", "bf16", "fp16"):
        problems.append("--precision must be auto, fp32, bf16 or fp16")
    if config.max_duration_s <= 0:
        problems.append("--max-duration-s must be positive")
    if problems:
        raise UserError("; ".join(problems))


def _fbank_config(loaded: LoadedModel, norm_stats: str | None) -> FbankConfig:
    if norm_stats is None:
        return FbankConfig.for_model(loaded.config)
    from pipeline.norm_stats import NormStats

    stats = NormStats.load(norm_stats)
    return FbankConfig.for_model(loaded.config, mean=stats.mean, std=stats.std)


def _window_settings(config: RunConfig, fbank_config: FbankConfig) -> tuple[float, float]:
    model_input_s = fbank_config.max_length * fbank_config.frame_shift_ms / 1000.0
    window_s = config.window_s or model_input_s
    if window_s > model_input_s + 1e-9:
        raise UserError(
            f"--window-s {window_s:g} is longer than the model's input of {model_input_s:g} s "
            f"({fbank_config.max_length} frames); audio past it would be dropped: "
            f"use at most {model_input_s:g}"
        )
    return window_s, config.hop_s or window_s


def _output_spec(
    config: RunConfig,
    loaded: LoadedModel,
    fbank_config: FbankConfig,
    window_s: float,
    hop_s: float,
) -> OutputSpec:
    settings = {
        "features": asdict(fbank_config),
        "window_s": window_s,
        "hop_s": hop_s,
        "top_k": config.top_k,
    }
    return OutputSpec(
        output_uri=config.output,
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
    markers: dict[str, dict],
    wall_s: float,
) -> RunSummary:
    planned = [markers[unit.unit_id] for unit in units if unit.unit_id in markers]
    labeled_now = {unit.unit_id for unit in todo}
    summary = RunSummary(output=output, wall_s=round(wall_s, 3))
    summary.shards = len(planned)
    summary.units_skipped = len(units) - len(todo)
    summary.units_labeled = len(todo)
    files_now = 0
    seconds_now = 0.0
    for marker in planned:
        summary.files += marker["files"]
        summary.windows += marker["windows"]
        summary.errors += marker["errors"]
        summary.audio_hours += marker["audio_seconds"] / 3600.0
        for reason, count in marker.get("error_reasons", {}).items():
            summary.error_reasons[reason] = summary.error_reasons.get(reason, 0) + count
        if marker["unit_id"] in labeled_now:
            files_now += marker["files"]
            seconds_now += marker["audio_seconds"]
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
    for reason, count in sorted(summary.error_reasons.items(), key=lambda item: -item[1])[:5]:
        lines.append(f"  error x{count}: {reason}")
    return "\n".join(lines)
