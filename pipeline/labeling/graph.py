"""The Ray Data graph of a labeling run, and the Ray settings it needs, each with its reason.

    WorkUnitSource   read tasks    fetch, decode, window, fbank: (B, T, F) in the model's dtype
    ClassifierActor  actor pool    batched AST (GPU or CPU) -> embedding, scores, top-k; the rows
                                   staged as Parquet parts under .ast-label/staging/<unit>/

The driver then commits each unit once all of its rows are staged (pipeline.output.commit).
`Placement` decides once, from the cluster's resources, how many of what run where.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import ray

from pipeline import defaults, rows
from pipeline.heads.head import Head
from pipeline.labeling.datasource import WorkUnitSource
from pipeline.labeling.plan import WorkUnit
from pipeline.labeling.summary import plural
from pipeline.output.schema import OutputSpec
from pipeline.settings import ClassifierSettings, FeatureSettings, LabelingOptions, ReadSettings

if TYPE_CHECKING:
    from ast_model.checkpoint import LoadedModel

# A read task keeps one core busy. Without GPUs the classifiers hold CPUs they use only as far as
# the model is heavy; a read asking for half a CPU lets reads use what a light model leaves (Ray
# Data's backpressure stops them from running ahead of a heavy one).
CPU_ONLY_READ_CPUS = 0.5
# On a GPU two batches in flight per actor: one computes while the other's parts go up to the
# store. On a CPU the model's threads already fill the cores.
GPU_CALLS_PER_CLASSIFIER = 2
# Ray Data restarts a dead actor forever by default, so a batch that kills its process would
# loop. On a cluster a few restarts ride out lost (spot) nodes; on one machine a dead actor is a
# crash that would recur: fail, and let the rerun resume. (Any restart also makes Ray log an
# error-level line at every actor start.)
CLUSTER_ACTOR_RESTARTS = 3
# Commits are small (read the unit's parts, write one file). In flight at once: one per
# COMMIT_CPUS CPUs of the cluster (at least 2): enough to keep up with the stream, few enough that
# Ray reuses idle workers instead of starting a process (2 CPU-s of imports) per commit.
COMMIT_CPUS = 4


@dataclass(frozen=True)
class Placement:
    """How many of what run where: decided once from the cluster's resources."""

    use_gpu: bool
    cpus: int
    gpus: int
    classifier_actors: int
    cpu_threads: int | None  # torch threads of a CPU classifier (None on GPU)
    read_cpus: float  # Ray's CPU request of a read task
    on_cluster: bool  # several nodes, or a submitted job (cluster.is_a_cluster): not this machine's

    @classmethod
    def for_resources(
        cls,
        resources: Mapping[str, float],
        device: str,
        classifier_actors: int | None,
        on_cluster: bool,
    ) -> Placement:
        gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        # --device cuda on a cluster with no GPU node up yet asks the autoscaler for one.
        use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
        # On CPU a model actor runs best with several threads: one per CPUS_PER_CPU_CLASSIFIER.
        per_actor = defaults.CPUS_PER_CPU_CLASSIFIER
        actors = classifier_actors or max(1, gpus if use_gpu else cpus // per_actor)
        threads = None if use_gpu else max(1, min(per_actor, cpus // actors))
        read_cpus = 1.0 if use_gpu else CPU_ONLY_READ_CPUS
        return cls(use_gpu, cpus, gpus, actors, threads, read_cpus, on_cluster)

    @property
    def commits_in_flight(self) -> int:
        return max(2, self.cpus // COMMIT_CPUS)

    def describe(self, options: LabelingOptions) -> str:
        device = "GPU" if self.use_gpu else "CPU"
        actors = plural(self.classifier_actors, "classifier actor")
        return (
            f"Ray: {plural(self.cpus, 'CPU')}, {plural(self.gpus, 'GPU')}; {actors} on {device}, "
            f"batches of {options.batch_rows(self.use_gpu)}"
        )


@dataclass(frozen=True)
class ModelInObjectStore:
    """The checked checkpoint files (ast_model.checkpoint_files), put in Ray's object store once by
    the driver: every actor builds its model from there instead of re-reading the checkpoint (a
    hub id, an s3:// URI, a path only the driver's machine has), and the driver never loads torch.

    Wrapped rather than passed as a bare ObjectRef: Ray counts a bare ref as an actor argument
    "in the object store" and, where actors may restart, logs an error-level line at every actor
    start. The driver holds the reference for the whole run, so it is not lost.
    """

    ref: ray.ObjectRef

    def load(self) -> LoadedModel:
        from ast_model.checkpoint import build_model

        return build_model(ray.get(self.ref))


class ClassifierActor:
    """What each classifier actor runs: pipeline.labeling.classify.ClassifyAndStage, built in the
    actor. Named here so that the driver can hand it to Ray without importing torch."""

    def __init__(
        self,
        model: ModelInObjectStore,
        settings: ClassifierSettings,
        spec: OutputSpec,
        head: Head | None,
    ) -> None:
        from pipeline.labeling.classify import ClassifyAndStage

        self._stage = ClassifyAndStage(model.load(), settings, spec, head)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._stage(batch)


def labeling_graph(
    units: Sequence[WorkUnit],
    input_bytes: int,
    read: ReadSettings,
    features: FeatureSettings,
    classifier: ClassifierSettings,
    model: ModelInObjectStore,
    head: Head | None,
    spec: OutputSpec,
    placement: Placement,
) -> ray.data.Dataset:
    """read tasks -> classifier actors: a dataset of staging records (output.staging).
    `input_bytes`: the units' sources', as listed (0: unknown), which sizes the read tasks."""
    ray.data.DataContext.get_current().target_max_block_size = _batch_bytes(features)
    source = WorkUnitSource(units, read, features, placement.cpus, input_bytes=input_bytes)
    dataset = ray.data.read_datasource(source, **_read_task_options(source, placement))
    with warnings.catch_warnings():
        # max_restarts has no named parameter in Ray 2.60; passing it as a remote arg warns.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return dataset.map_batches(
            ClassifierActor,
            fn_constructor_kwargs={
                "model": model,
                "settings": classifier,
                "spec": spec,
                "head": head,
            },
            batch_size=features.batch_rows,
            batch_format="numpy",
            zero_copy_batch=True,
            **_classifier_options(placement),
        )


def _batch_bytes(features: FeatureSettings) -> int:
    """One batch's fbank. Ray Data gathers a task's output into a block until it reaches
    target_max_block_size (128 MiB): a whole read task's fbank would move as one late block. A
    target of one batch's fbank makes every batch (its fbank plus the other columns) a block of
    its own: the stream stays fine-grained and the classifier gets its batches as they are,
    without re-batching."""
    itemsize = np.dtype(rows.FEATURE_DTYPES[features.dtype]).itemsize
    return features.batch_rows * features.fbank.max_length * features.fbank.num_mel_bins * itemsize


def _read_task_options(source: WorkUnitSource, placement: Placement) -> dict:
    return {
        "num_cpus": placement.read_cpus,
        # One output stream per read task: Ray would otherwise split the blocks (already the
        # classifier's batch size) to reach its own guess of the parallelism.
        "override_num_blocks": source.read_task_count,
        # With GPUs in the cluster the read tasks use Ray's default scheduling, which keeps them
        # off GPU nodes while others fit (Ray Data would otherwise spread them over all nodes).
        **({"scheduling_strategy": "DEFAULT"} if placement.use_gpu else {}),
    }


def _classifier_options(placement: Placement) -> dict:
    calls = GPU_CALLS_PER_CLASSIFIER if placement.use_gpu else 1
    return {
        "compute": ray.data.ActorPoolStrategy(
            size=placement.classifier_actors,
            max_concurrent_calls_per_actor=calls,
            enable_true_multi_threading=calls > 1,
        ),
        "num_gpus": 1 if placement.use_gpu else 0,
        "num_cpus": 1,
        "max_restarts": CLUSTER_ACTOR_RESTARTS if placement.on_cluster else 0,
    }
