"""A head: your own labels, as a linear classifier on the embedding that ast-label stores.

A head lives in a folder of its own:

    HEAD/config.json         what it is: label names in order, a threshold per label, single- or
                             multi-label, the base model it was trained on (name, weights sha256,
                             hidden size), the training set and its cross-validation figures
    HEAD/head.safetensors    weight (H, D) and bias (H,), float32: logits = embedding @ W.T + b
    HEAD/README.md           its model card

Scores are sigmoid(logits) for a multi-label head, softmax(logits) for a single-label one; a row's
labels are the classes whose score reaches their threshold, best first. Any standardisation the
training used is folded into W and b, so the raw stored embedding goes in as it is. numpy and
safetensors are all it takes to use one (the README shows the lines); this module is how
ast-label itself loads, checks and applies it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from pipeline.errors import UserError
from pipeline.storage import StorageError, filesystem_for, join_uri, put_file, with_retries

HEAD_FORMAT = "ast-label-head"
HEAD_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "head.safetensors"
CARD_NAME = "README.md"


class HeadError(UserError):
    """A head folder that cannot be read or does not fit the model: the message says why."""


@dataclass(frozen=True)
class Head:
    label_names: tuple[str, ...]
    thresholds: np.ndarray  # (H,) float32: a row has a label when its score reaches its threshold
    multi_label: bool  # sigmoid scores (independent labels) or softmax (one label per row)
    weight: np.ndarray = field(repr=False)  # (H, D) float32
    bias: np.ndarray = field(repr=False)  # (H,) float32
    base_model: dict[str, Any] = field(default_factory=dict)  # name, weights_sha256, hidden_size
    details: dict[str, Any] = field(default_factory=dict, repr=False)  # training, cross-validation
    sha256: str = ""  # of head.safetensors: names this head in outputs and refusals
    name: str = ""  # where it was loaded from

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def scores(self, embedding: np.ndarray) -> np.ndarray:
        """(B, D) embeddings -> (B, H) float32 scores."""
        logits = np.asarray(embedding, dtype=np.float32) @ self.weight.T + self.bias  # (B, H)
        if self.multi_label:
            return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)

    def labels(self, scores: np.ndarray) -> list[list[str]]:
        """(B, H) scores -> per row, the labels at or above their thresholds, best first."""
        return labels_at_thresholds(scores, self.thresholds, self.label_names)

    def describe(self) -> dict[str, Any]:
        """What an output records of the head that labeled it (file metadata, resume checks); its
        path is recorded apart (a copy of the same head elsewhere labels alike)."""
        return {
            "sha256": self.sha256,
            "label_names": list(self.label_names),
            "thresholds": [float(t) for t in self.thresholds],
            "multi_label": self.multi_label,
        }

    def check_base(self, weights_sha256: str, hidden_size: int, where: str) -> None:
        """Raises HeadError unless the head was trained on this base model's embeddings."""
        if self.hidden_size != hidden_size:
            raise HeadError(
                f"head {self.name} reads {self.hidden_size}-d embeddings, but {where} has "
                f"{hidden_size}-d ones: use a head trained on the same base model"
            )
        trained_on = self.base_model.get("weights_sha256")
        if trained_on and trained_on != weights_sha256:
            raise HeadError(
                f"head {self.name} was trained on the embeddings of another model "
                f"({self.base_model.get('name', '?')}, weights {trained_on[:12]}), not those of "
                f"{where} (weights {weights_sha256[:12]}): use a head trained on that model"
            )


def labels_at_thresholds(
    scores: np.ndarray, thresholds: np.ndarray, names: tuple[str, ...]
) -> list[list[str]]:
    """(B, H) scores -> per row, the names whose score reaches its threshold, best first."""
    order = np.argsort(-scores, axis=1, kind="stable")  # (B, H)
    passed = np.take_along_axis(scores >= np.asarray(thresholds), order, axis=1)
    return [[names[i] for i in row[ok]] for row, ok in zip(order, passed, strict=True)]


def save_head(head: Head, folder: str, card: str) -> Head:
    """Writes the head's folder (config.json, head.safetensors, README.md); returns the head with
    its sha256 and name set."""
    weights = save_tensors(
        {
            "weight": np.ascontiguousarray(head.weight, dtype=np.float32),
            "bias": np.ascontiguousarray(head.bias, dtype=np.float32),
        }
    )
    saved = Head(
        head.label_names,
        np.asarray(head.thresholds, dtype=np.float32),
        head.multi_label,
        head.weight.astype(np.float32),
        head.bias.astype(np.float32),
        head.base_model,
        head.details,
        hashlib.sha256(weights).hexdigest(),
        folder,
    )
    config = {
        "format": HEAD_FORMAT,
        "version": HEAD_VERSION,
        "label_names": list(saved.label_names),
        "thresholds": [float(t) for t in saved.thresholds],
        "multi_label": saved.multi_label,
        "base_model": saved.base_model,
        **saved.details,
    }
    fs, root = filesystem_for(folder)
    put_file(fs, f"{root}/{WEIGHTS_NAME}", weights)
    put_file(fs, f"{root}/{CONFIG_NAME}", (json.dumps(config, indent=2) + "\n").encode())
    put_file(fs, f"{root}/{CARD_NAME}", card.encode())
    return saved


def load_head(folder: str) -> Head:
    """Reads a head folder (local path or URI). HeadError for anything missing or inconsistent;
    a store that keeps failing is a StorageError."""
    fs, root = filesystem_for(folder)
    config_text = _read(fs, f"{root}/{CONFIG_NAME}", folder)
    weights_bytes = _read(fs, f"{root}/{WEIGHTS_NAME}", folder)
    try:
        config = json.loads(config_text)
        tensors = load_tensors(weights_bytes)
    except Exception as error:  # json and safetensors raise assorted types for damaged files
        raise HeadError(f"head {folder} is damaged: {error}") from None
    if config.get("format") != HEAD_FORMAT:
        raise HeadError(f"{join_uri(folder, CONFIG_NAME)} is not an ast-label head's config")
    weight = tensors.get("weight")
    bias = tensors.get("bias")
    names = tuple(str(name) for name in config.get("label_names", ()))
    thresholds = np.asarray(config.get("thresholds", ()), dtype=np.float32)
    shapes_fit = (
        weight is not None
        and bias is not None
        and weight.ndim == 2
        and weight.shape[0] == len(names) == len(thresholds) == bias.shape[0]
    )
    if not shapes_fit or len(names) < 2:
        raise HeadError(
            f"head {folder}: its weights, label names and thresholds do not fit together; "
            "train it again with `ast-label head train`"
        )
    known = {"format", "version", "label_names", "thresholds", "multi_label", "base_model"}
    return Head(
        label_names=names,
        thresholds=thresholds,
        multi_label=bool(config.get("multi_label")),
        weight=weight.astype(np.float32),
        bias=bias.astype(np.float32),
        base_model=dict(config.get("base_model") or {}),
        details={key: value for key, value in config.items() if key not in known},
        sha256=hashlib.sha256(weights_bytes).hexdigest(),
        name=folder,
    )


def _read(fs, path: str, folder: str) -> bytes:
    try:
        return with_retries(lambda: fs.cat_file(path), f"cannot read {path}")
    except StorageError as error:
        if isinstance(error.__cause__, FileNotFoundError | PermissionError | IsADirectoryError):
            name = path.rsplit("/", 1)[-1]
            raise HeadError(
                f"head {folder}: cannot read {name} ({error}); give the folder that "
                "`ast-label head train` wrote"
            ) from None
        raise
