"""The Audio Spectrogram Transformer for batch labeling: features, model, checkpoints, labels.

Free of Ray and of the pipeline: importable and testable alone. Names are imported on first use
(PEP 562), so that `import ast_model.config` stays light: the command line reads DEFAULT_MODEL,
and the Ray driver checks a checkpoint (read_checkpoint), without paying for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_MODEL": "ast_model.config",
    "ASTConfig": "ast_model.config",
    "FbankConfig": "ast_model.config",
    "CheckpointError": "ast_model.checkpoint_files",
    "CheckpointFiles": "ast_model.checkpoint_files",
    "read_checkpoint": "ast_model.checkpoint_files",
    "LoadedModel": "ast_model.checkpoint",
    "build_model": "ast_model.checkpoint",
    "load_checkpoint": "ast_model.checkpoint",
    "save_checkpoint": "ast_model.checkpoint",
    "compute_fbank": "ast_model.features",
    "num_fbank_frames": "ast_model.features",
    "scores_from_logits": "ast_model.labels",
    "top_label_ids": "ast_model.labels",
    "ASTForAudioClassification": "ast_model.model",
    "ASTOutput": "ast_model.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ast_model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
