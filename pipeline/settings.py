"""Every setting of a labeling run, checked once, and the settings each stage takes from them.

    LabelingOptions    what `run` and `predict` share (model, windows, batch, device, precision...)
    RunConfig          a `run`: inputs, output, and how it uses the cluster
      -> ReadSettings        the read stage's windows and size limits
      -> FeatureSettings     the read stage's fbank, in the classifier's dtype and batch size
      -> ClassifierSettings  the classifier's device, precision, top-k and threads

Free of torch and Ray: the driver resolves everything here, the stages receive the results.
Defaults come from pipeline.defaults.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, fields
from typing import Any

from ast_model.config import DEFAULT_MODEL, ASTConfig, FbankConfig
from pipeline import defaults
from pipeline.errors import UserError

# --precision -> the autocast dtype's name (None: plain fp32); "auto" is resolved per device.
AUTOCAST_DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class ReadSettings:
    """How a read task cuts a unit's files into windows, and what it refuses to decode."""

    window_s: float
    hop_s: float
    max_duration_s: float = defaults.MAX_DURATION_S
    max_member_bytes: int = defaults.MAX_MEMBER_BYTES


@dataclass(frozen=True)
class FeatureSettings:
    """How a read task turns windows into the classifier's input."""

    fbank: FbankConfig
    dtype: str = "float32"  # a key of rows.FEATURE_DTYPES: the classifier's input dtype
    batch_rows: int = defaults.CPU_BATCH_SIZE  # rows per batch: the classifier's batch size


@dataclass(frozen=True)
class ClassifierSettings:
    device: str = defaults.DEVICE  # "auto" resolves where the model runs (a node may lack CUDA)
    precision: str = defaults.PRECISION
    top_k: int = defaults.TOP_K
    cpu_threads: int | None = None  # torch threads of a CPU classifier (None: leave torch's)


@dataclass(frozen=True)
class LabelingOptions:
    model: str = DEFAULT_MODEL
    batch_size: int | None = None  # None: defaults.GPU_BATCH_SIZE on GPU, CPU_BATCH_SIZE on CPU
    device: str = defaults.DEVICE
    precision: str = defaults.PRECISION
    window_s: float | None = None  # None: the model's input length (10.24 s for 1024 frames)
    hop_s: float | None = None  # None: equal to the window, no overlap
    allow_gaps: bool = False  # a hop longer than the window skips audio: only when asked
    top_k: int = defaults.TOP_K
    max_duration_s: float = defaults.MAX_DURATION_S
    max_member_bytes: int = defaults.MAX_MEMBER_BYTES
    norm_stats: str | None = None
    head: str | None = None  # a head folder (`ast-label head train`): its labels beside the model's

    @classmethod
    def take(cls, values: dict[str, Any]) -> LabelingOptions:
        """Pops this class's fields out of `values` (e.g. a command's keyword arguments)."""
        return cls(**{f.name: values.pop(f.name) for f in fields(cls) if f.name in values})

    def check(self, gpu_may_appear: bool = False) -> None:
        """Raises UserError naming every option that is out of range. `gpu_may_appear`: on a
        cluster, whose autoscaler may still bring up GPU nodes, --device cuda is not checked."""
        problems = []
        if self.batch_size is not None and self.batch_size < 1:
            problems.append("--batch-size must be at least 1")
        if self.top_k < 1:
            problems.append("--top-k must be at least 1")
        for name, value in (("--window-s", self.window_s), ("--hop-s", self.hop_s)):
            if value is not None and value <= 0:
                problems.append(f"{name} must be positive")
        if self.device not in defaults.DEVICES:
            problems.append(f"--device must be one of {', '.join(defaults.DEVICES)}")
        elif self.device == "cuda" and not gpu_may_appear and not local_gpu_count():
            problems.append(
                "--device cuda: this machine has no usable GPU; use --device cpu or auto"
            )
        if self.precision not in defaults.PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(defaults.PRECISIONS)}")
        if self.max_duration_s <= 0:
            problems.append("--max-duration-s must be positive")
        if self.max_member_bytes < 1:
            problems.append("max_member_bytes must be at least 1")
        if problems:
            raise UserError("; ".join(problems))

    def fbank_config(self, model: ASTConfig) -> FbankConfig:
        """The model's fbank settings, with the corpus's own mean and std under --norm-stats."""
        if self.norm_stats is None:
            return FbankConfig.for_model(model)
        from pipeline.normalisation import NormStats

        stats = NormStats.load(self.norm_stats)
        return FbankConfig.for_model(model, mean=stats.mean, std=stats.std)

    def read_settings(self, fbank: FbankConfig) -> ReadSettings:
        """The windows, refusing settings that would drop or skip audio without a word."""
        model_input_s = fbank.input_seconds
        window_s = self.window_s or model_input_s
        hop_s = self.hop_s or window_s
        if window_s > model_input_s + 1e-9:
            raise UserError(
                f"--window-s {window_s:g} is longer than the model's input of "
                f"{model_input_s:g} s ({fbank.max_length} frames); audio past it would be "
                f"dropped: use at most {model_input_s:g}"
            )
        if window_s < fbank.frame_seconds - 1e-9:
            raise UserError(
                f"--window-s {window_s:g} is shorter than one fbank frame "
                f"({fbank.frame_seconds:g} s): windows would hold no audio the model sees; "
                f"use at least {fbank.frame_seconds:g}"
            )
        if hop_s > window_s + 1e-9 and not self.allow_gaps:
            raise UserError(
                f"--hop-s {hop_s:g} is longer than --window-s {window_s:g}: the audio between "
                "windows would never be labeled; use a hop up to the window, or --allow-gaps"
            )
        return ReadSettings(window_s, hop_s, self.max_duration_s, self.max_member_bytes)

    def feature_settings(self, fbank: FbankConfig, use_gpu: bool) -> FeatureSettings:
        dtype = feature_dtype(self.precision, use_gpu)
        return FeatureSettings(fbank, dtype, self.batch_rows(use_gpu))

    def classifier_settings(self, use_gpu: bool, cpu_threads: int | None) -> ClassifierSettings:
        # "auto" stays "auto" on a GPU node (it resolves where the model runs); on CPU it is cpu.
        device = self.device if use_gpu else "cpu"
        return ClassifierSettings(device, self.precision, self.top_k, cpu_threads)

    def batch_rows(self, use_gpu: bool) -> int:
        if self.batch_size:
            return self.batch_size
        return defaults.GPU_BATCH_SIZE if use_gpu else defaults.CPU_BATCH_SIZE


@dataclass(frozen=True)
class RunConfig:
    inputs: tuple[str, ...]
    output: str
    options: LabelingOptions = LabelingOptions()  # model, windows, batch, device, precision...
    manifest: str | None = None
    classifier_actors: int | None = None  # None: one per GPU, or one per 8 CPUs on CPU
    files_per_unit: int = defaults.FILES_PER_UNIT
    overwrite: bool = False
    address: str | None = None  # a Ray cluster to join; None: a Ray of this machine's own
    verbose: bool = False  # Ray's own logs and progress bars

    def check(self) -> None:
        """Raises UserError for what is wrong with the run's options, before anything starts."""
        problems = []
        if not self.inputs and not self.manifest:
            problems.append("give at least one INPUT or --manifest")
        if self.classifier_actors is not None and self.classifier_actors < 1:
            problems.append("--classifier-actors must be at least 1")
        if problems:
            raise UserError("; ".join(problems))
        # On a cluster (--address) the autoscaler may still bring GPU nodes up; here it cannot.
        self.options.check(gpu_may_appear=bool(self.address))


def autocast_dtype(precision: str, device_type: str) -> str | None:
    """The autocast dtype's name ("bfloat16", "float16"), or None for plain fp32."""
    if precision == "auto":
        return "bfloat16" if device_type == "cuda" else None
    return AUTOCAST_DTYPES[precision]


def feature_dtype(precision: str, use_gpu: bool) -> str:
    """The fbank dtype read tasks send: the autocast dtype when the classifier computes in one.

    Under autocast the patch embedding's convolution, the first thing to read the fbank, casts
    its input to that dtype, so sending it already cast changes no number and halves what crosses
    the object store.
    """
    return autocast_dtype(precision, "cuda" if use_gpu else "cpu") or "float32"


def local_gpu_count() -> int:
    """CUDA devices this machine has, asked of the driver library itself: torch (3 CPU-s to
    import) is never loaded on the driver for this."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value
