"""From logits to per-label scores and the top labels of each clip."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def scores_from_logits(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """(B, L) logits -> (B, L) float32 scores: independent sigmoids for multi-label checkpoints
    (AudioSet), a softmax over labels for single-label ones."""
    logits = logits.float()
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


def top_k(
    scores: np.ndarray, k: int, label_names: Sequence[str]
) -> tuple[list[list[str]], list[list[float]]]:
    """The k best labels of each row of (B, L) scores, best first; ties go to the lower index."""
    if scores.ndim != 2 or scores.shape[1] != len(label_names):
        raise ValueError(
            f"scores must be (B, {len(label_names)}) for {len(label_names)} labels, "
            f"got {scores.shape}"
        )
    k = max(0, min(k, scores.shape[1]))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (B, k)
    names = [[label_names[i] for i in row] for row in order]
    values = np.take_along_axis(scores, order, axis=1).astype(float).tolist()
    return names, values
