"""The torch side of checkpoints: build the model from checked files; write Hugging Face's format.

checkpoint_files finds, reads and checks a checkpoint without torch (the Ray driver stops there);
build_model turns what it read into the module, remapping names through layouts.py's tables.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from ast_model.checkpoint_files import (
    HF_CONFIG,
    HF_WEIGHTS,
    CheckpointError,
    CheckpointFiles,
    read_checkpoint,
)
from ast_model.config import ASTConfig, FbankConfig
from ast_model.layouts import HF_LAYOUT, LAYOUTS, Layout, layout_names, state_dict_in
from ast_model.model import ASTForAudioClassification

HF_PREPROCESSOR = "preprocessor_config.json"


@dataclass(frozen=True)
class LoadedModel:
    model: ASTForAudioClassification  # eval mode, fp32, on CPU
    config: ASTConfig
    name: str  # the URI / hub id / DEFAULT_MODEL_NAME
    weights_sha256: str  # sha256 of the weights file's bytes


def load_checkpoint(uri: str, *, original_config: ASTConfig | None = None) -> LoadedModel:
    """Loads a model for inference. original_config sets what an original .pth cannot tell
    (strides, max_length, heads, labels); shapes found in the weights always win."""
    return build_model(read_checkpoint(uri, original_config=original_config))


def build_model(files: CheckpointFiles) -> LoadedModel:
    """The model with the files' weights: eval mode, fp32, on CPU. read_checkpoint has checked
    every name and shape; what can still fail here is a file body its headers misdescribe."""
    model = ASTForAudioClassification(files.config)
    layout = LAYOUTS[files.layout]
    try:
        state = state_dict_in(_parse_weights(files.weights, files.weights_file), files.layout)
        ours = {key: _from_layout(state, layout_names(key, layout)) for key in model.state_dict()}
        with torch.no_grad():
            model.load_state_dict(ours)  # copies into fp32 parameters, whatever the file's dtype
    except Exception as error:  # safetensors and torch raise assorted types for damaged files
        raise CheckpointError(
            f"{files.weights_file} is damaged or not a weights file: {error}"
        ) from error
    return LoadedModel(model.float().eval(), files.config, files.name, files.weights_sha256)


def save_checkpoint(
    model: ASTForAudioClassification, config: ASTConfig, directory: str | Path
) -> None:
    """Writes config.json + model.safetensors with Hugging Face's key names, and the matching
    preprocessor_config.json, so that transformers' from_pretrained and its audio-classification
    pipeline load the folder as well as load_checkpoint does."""
    state = _to_layout(model.state_dict(), HF_LAYOUT)
    weights = safetensors_save(state, metadata={"format": "pt"})
    fs, root = fsspec.core.url_to_fs(str(directory))
    fs.makedirs(root, exist_ok=True)
    root = root.rstrip("/")
    for name, settings in (
        (HF_CONFIG, config.to_hf_dict()),
        (HF_PREPROCESSOR, feature_extractor_settings(config)),
    ):
        fs.pipe_file(f"{root}/{name}", (json.dumps(settings, indent=2) + "\n").encode())
    fs.pipe_file(f"{root}/{HF_WEIGHTS[0]}", weights)


def feature_extractor_settings(config: ASTConfig) -> dict:
    """transformers' ASTFeatureExtractor settings that compute this model's input, as
    ast_model.features does (AudioSet's mean and std)."""
    fbank = FbankConfig.for_model(config)
    return {
        "feature_extractor_type": "ASTFeatureExtractor",
        "feature_size": 1,
        "sampling_rate": fbank.sample_rate,
        "num_mel_bins": fbank.num_mel_bins,
        "max_length": fbank.max_length,
        "mean": fbank.mean,
        "std": fbank.std,
        "do_normalize": True,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }


def _parse_weights(data: bytes, path: str) -> object:
    if path.endswith(".safetensors"):
        return safetensors_load(data)
    # weights_only refuses pickled code: a checkpoint file must not be able to run anything.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _from_layout(state: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([state[n] for n in names]) if len(names) > 1 else state[names[0]]


def _to_layout(state: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        names = layout_names(key, layout)
        for name, part in zip(names, tensor.chunk(len(names)), strict=True):
            out[name] = part.detach().float().contiguous().cpu()
    return out

