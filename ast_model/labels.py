"""From logits to per-label scores and the top labels of each clip."""

from __future__ import annotations

import numpy as np
import torch


def scores_from_logits(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """(B, L) logits -> (B, L) float32 scores: independent sigmoids for multi-label checkpoints
    (AudioSet), a softmax over labels for single-label ones."""
    logits = logits.float()
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


def top_label_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, C) scores -> (B, k) int32 label ids, best first; ties go to the lower id."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int32)
