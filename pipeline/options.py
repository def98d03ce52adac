"""How audio becomes labels: the options `run` and `predict` share, their checks, and what they
resolve to once the model is known. One class, so both commands accept and refuse the same."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from ast_model.checkpoint import LoadedModel
from ast_model.config import DEFAULT_MODEL
from ast_model.features import FbankConfig
from pipeline import defaults
from pipeline.errors import UserError
from pipeline.stages import ReadSettings


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
        elif self.device == "cuda" and not gpu_may_appear and not _local_gpu():
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

    def fbank_config(self, loaded: LoadedModel) -> FbankConfig:
        """The model's fbank settings, with the corpus's own mean and std under --norm-stats."""
        if self.norm_stats is None:
            return FbankConfig.for_model(loaded.config)
        from pipeline.norm_stats import NormStats

        stats = NormStats.load(self.norm_stats)
        return FbankConfig.for_model(loaded.config, mean=stats.mean, std=stats.std)

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

    def batch_rows(self, use_gpu: bool) -> int:
        if self.batch_size:
            return self.batch_size
        return defaults.GPU_BATCH_SIZE if use_gpu else defaults.CPU_BATCH_SIZE


def _local_gpu() -> bool:
    return torch.cuda.is_available()
