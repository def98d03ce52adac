"""The classify stage: fbank -> pooled embedding, label scores and top-k, one model per process.

`Classify` is a plain callable on batches (pipeline.rows), used by `predict` in its own process;
`ClassifyAndStage` is what each Ray classifier actor runs (graph.ClassifierActor builds it there):
it classifies each batch and writes its rows as staging parts from the same process
(pipeline.output.staging), so only the small records of the parts leave it. This module loads
torch: the driver never imports it.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ast_model.checkpoint import LoadedModel
from ast_model.labels import scores_from_logits, top_label_ids
from pipeline import rows
from pipeline.heads.head import Head
from pipeline.labeling.transport import fbank_to_torch
from pipeline.output.schema import OutputSpec
from pipeline.output.staging import write_staging_parts
from pipeline.settings import ClassifierSettings, autocast_dtype

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Classify:
    """fbank -> pooled embedding (B, D), label scores (B, C), top-k label ids (B, k); with a head,
    the head's scores (B, H) of the same embedding."""

    def __init__(self, loaded: LoadedModel, settings: ClassifierSettings, head: Head | None = None):
        self.device = resolve_device(settings.device)
        if self.device.type == "cpu" and settings.cpu_threads:
            # Ray pins OMP_NUM_THREADS to the actor's CPU request (1); on a CPU-only machine the
            # model is the bottleneck and should use the cores that the light stages leave idle.
            torch.set_num_threads(min(settings.cpu_threads, os.cpu_count() or 1))
        dtype_name = autocast_dtype(settings.precision, self.device.type)
        self.autocast_dtype = _TORCH_DTYPES[dtype_name] if dtype_name else None
        self.model = loaded.model.to(self.device).eval()
        self.multi_label = loaded.config.multi_label
        self.hidden_size = loaded.config.hidden_size
        self.num_labels = loaded.config.num_labels
        self.top_k = min(settings.top_k, self.num_labels)
        self.head = head

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fbank = batch.pop(rows.FBANK)  # (B, T, F)
        labeled = rows.labeled_rows(batch)
        count = len(labeled)
        if labeled.all():
            embedding, scores = self._forward(fbank_to_torch(fbank))
        else:
            embedding = np.zeros((count, self.hidden_size), dtype=np.float32)
            scores = np.zeros((count, self.num_labels), dtype=np.float32)
            index = np.flatnonzero(labeled)
            if len(index):
                embedding[index], scores[index] = self._forward(fbank_to_torch(fbank)[index])
        batch[rows.EMBEDDING] = embedding
        batch[rows.SCORES] = scores
        batch[rows.TOP_INDEX] = top_label_ids(scores, self.top_k)
        if self.head is not None:
            head_scores = np.zeros((count, self.head.num_labels), dtype=np.float32)
            head_scores[labeled] = self.head.scores(embedding[labeled])
            batch[rows.HEAD_SCORES] = head_scores
        return batch

    @torch.inference_mode()
    def _forward(self, fbank: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, T, F) -> (B, D) embedding and (B, C) scores, float32 numpy."""
        compute_dtype = self.autocast_dtype or torch.float32
        # Features may arrive in a narrower dtype than the model computes in (an actor that fell
        # back to the CPU): the model casts them to its own unless autocast does.
        inputs = fbank.to(self.device, non_blocking=True)
        with torch.autocast(
            self.device.type, dtype=compute_dtype, enabled=self.autocast_dtype is not None
        ):
            output = self.model(inputs)
        scores = scores_from_logits(output.logits.float(), self.multi_label)
        return output.embedding.float().cpu().numpy(), scores.cpu().numpy()


class ClassifyAndStage:
    """A classifier actor's work: Classify a batch, then stage its rows from the same process.
    Results never cross a process boundary, and no process is started per write: separate write
    tasks cost a worker start (2 CPU-s of imports) for each burst of parts."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: ClassifierSettings,
        spec: OutputSpec,
        head: Head | None = None,
    ):
        self.classify = Classify(loaded, settings, head)
        self.spec = spec

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return write_staging_parts(self.classify(batch), self.spec)
