"""The Audio Spectrogram Transformer for batch labeling: features, model, checkpoints, labels.

Free of Ray and of the pipeline: importable and testable alone.
"""

from ast_model.checkpoint import (
    DEFAULT_MODEL,
    CheckpointError,
    LoadedModel,
    load_checkpoint,
    save_checkpoint,
)
from ast_model.config import ASTConfig
from ast_model.features import FbankConfig, compute_fbank, num_fbank_frames
from ast_model.labels import scores_from_logits, top_k
from ast_model.model import ASTForAudioClassification, ASTOutput

__all__ = [
    "DEFAULT_MODEL",
    "ASTConfig",
    "ASTForAudioClassification",
    "ASTOutput",
    "CheckpointError",
    "FbankConfig",
    "LoadedModel",
    "compute_fbank",
    "load_checkpoint",
    "num_fbank_frames",
    "save_checkpoint",
    "scores_from_logits",
    "top_k",
]
