"""The model's and the features' settings, free of torch: ASTConfig (the model's shape and labels,
read from and written to a Hugging Face config.json) and FbankConfig (its input features)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

HF_MODEL_TYPE = "audio-spectrogram-transformer"
# `--model default`: the small checkpoint bundled in ast_model/default (see its model card).
DEFAULT_MODEL = "default"
MULTI_LABEL = "multi_label_classification"
SINGLE_LABEL = "single_label_classification"
AUDIOSET_NUM_LABELS = 527
# transformers' names of the activations ast_model.model implements.
HIDDEN_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")

# Written to config.json so transformers reads our checkpoints as it reads its own; ignored on read
# (inference has no dropout, and initialisation does not matter for loaded weights).
_HF_TRAINING_DEFAULTS: dict[str, Any] = {
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
}


@dataclass(frozen=True)
class ASTConfig:
    """Field names and defaults are Hugging Face ASTConfig's (AST-base, as in
    MIT/ast-finetuned-audioset-10-10-0.4593)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    patch_size: int = 16
    qkv_bias: bool = True
    frequency_stride: int = 10
    time_stride: int = 10
    max_length: int = 1024  # fbank frames of the input
    num_mel_bins: int = 128
    id2label: tuple[str, ...] = ()  # label names in index order
    problem_type: str | None = None  # MULTI_LABEL | SINGLE_LABEL | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "id2label", tuple(str(name) for name in self.id2label))
        if self.hidden_act not in HIDDEN_ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported (one of {HIDDEN_ACTIVATIONS})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.problem_type not in (None, MULTI_LABEL, SINGLE_LABEL):
            raise ValueError(
                f"problem_type {self.problem_type!r} is not supported "
                f"(use {MULTI_LABEL!r}, {SINGLE_LABEL!r} or None)"
            )
        if min(self.patch_grid) < 1:
            raise ValueError(
                f"a {self.patch_size}x{self.patch_size} patch does not fit a "
                f"{self.max_length}x{self.num_mel_bins} spectrogram"
            )

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def multi_label(self) -> bool:
        """Sigmoid scores (independent labels) or softmax (one label per clip)."""
        if self.problem_type is None:
            # Hub AST checkpoints leave problem_type unset; AudioSet's 527 classes are multi-label.
            return self.num_labels == AUDIOSET_NUM_LABELS
        return self.problem_type == MULTI_LABEL

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(frequency patches, time patches) that the strided patch convolution produces."""
        frequency = (self.num_mel_bins - self.patch_size) // self.frequency_stride + 1
        time = (self.max_length - self.patch_size) // self.time_stride + 1
        return frequency, time

    @property
    def num_patches(self) -> int:
        frequency, time = self.patch_grid
        return frequency * time

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ASTConfig:
        """Reads a Hugging Face config.json dict; unknown and training-only keys are ignored."""
        model_type = d.get("model_type", HF_MODEL_TYPE)
        if model_type != HF_MODEL_TYPE:
            raise ValueError(
                f"config describes a {model_type!r} model, not an Audio Spectrogram Transformer"
            )
        names = {f.name for f in fields(cls)} - {"id2label"}
        values: dict[str, Any] = {name: d[name] for name in names if name in d}
        if isinstance(values.get("patch_size"), (list, tuple)):
            height, width = values["patch_size"]
            if height != width:
                raise ValueError(f"non-square patch_size {values['patch_size']} is not supported")
            values["patch_size"] = height
        return cls(**values, id2label=_labels_from_hf(d))

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["ASTForAudioClassification"],
            "model_type": HF_MODEL_TYPE,
        }
        for f in fields(self):
            if f.name != "id2label":
                d[f.name] = getattr(self, f.name)
        d.update(_HF_TRAINING_DEFAULTS)
        # JSON object keys are strings; transformers turns them back into ints on load.
        d["id2label"] = {str(i): name for i, name in enumerate(self.id2label)}
        d["label2id"] = {name: i for i, name in enumerate(self.id2label)}
        return dict(sorted(d.items()))

    @classmethod
    def from_json_file(cls, path: str | Path) -> ASTConfig:
        return cls.from_hf_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n", encoding="utf-8")


# The smallest AST the pipeline runs: tests and benchmarks.
TINY_CONFIG = ASTConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    frequency_stride=16,
    time_stride=16,
)


@dataclass(frozen=True)
class FbankConfig:
    sample_rate: int = 16000
    num_mel_bins: int = 128
    max_length: int = 1024  # frames after padding/truncation
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    # AudioSet statistics (ASTFeatureExtractor's defaults).
    mean: float = -4.2677393
    std: float = 4.5689974

    @classmethod
    def for_model(
        cls, cfg: ASTConfig, mean: float | None = None, std: float | None = None
    ) -> FbankConfig:
        stats = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
        return cls(num_mel_bins=cfg.num_mel_bins, max_length=cfg.max_length, **stats)

    @property
    def input_seconds(self) -> float:
        """Audio that fills the model's input: max_length frames, 10.24 s for 1024."""
        return self.max_length * self.frame_shift_ms / 1000.0

    @property
    def frame_seconds(self) -> float:
        """One fbank frame (25 ms): less audio than this gives no frame at all."""
        return self.frame_length_ms / 1000.0

    @property
    def window_size(self) -> int:
        return int(self.sample_rate * self.frame_length_ms * 0.001)  # kaldi truncates, as here

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms * 0.001)

    @property
    def fft_size(self) -> int:
        return 1 << (self.window_size - 1).bit_length()  # next power of two, 512 for 400


def _labels_from_hf(d: dict[str, Any]) -> tuple[str, ...]:
    id2label = d.get("id2label")
    if id2label is None:
        # transformers' default when a config names no labels: num_labels (2) generic names.
        return tuple(f"LABEL_{i}" for i in range(int(d.get("num_labels", 2))))
    by_index = {int(key): str(name) for key, name in id2label.items()}
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"id2label keys must be 0..{len(by_index) - 1}, got {sorted(by_index)}")
    return tuple(by_index[i] for i in range(len(by_index)))
