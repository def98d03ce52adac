"""`ast-label predict`: label a handful of files in this process, without Ray."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ast_model.checkpoint import LoadedModel
from ast_model.features import FbankConfig, compute_fbank, pad_waveforms
from ast_model.labels import scores_from_logits, top_k
from pipeline.audio import cut_windows, decode_audio
from pipeline.storage import filesystem_for

# predict is for a handful of files; a cap keeps one huge file from exhausting memory.
MAX_PREDICT_DURATION_S = 3600.0


@dataclass
class Prediction:
    path: str
    top_labels: list[str]
    top_scores: list[float]
    scores: np.ndarray  # (num_labels,) mean over the file's windows
    embedding: np.ndarray  # (hidden,) mean over the file's windows
    windows: int

    def to_json(self, with_scores: bool, with_embedding: bool) -> dict:
        record: dict = {
            "path": self.path,
            "top_labels": self.top_labels,
            "top_scores": [round(score, 6) for score in self.top_scores],
            "windows": self.windows,
        }
        if with_scores:
            record["scores"] = self.scores.tolist()
        if with_embedding:
            record["embedding"] = self.embedding.tolist()
        return record


class FilePredictor:
    def __init__(
        self, loaded: LoadedModel, fbank_config: FbankConfig | None = None, device: str = "cpu"
    ):
        self.loaded = loaded
        self.fbank_config = fbank_config or FbankConfig.for_model(loaded.config)
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        self.window_s = self.fbank_config.max_length * self.fbank_config.frame_shift_ms / 1000.0

    def predict(self, path: str, k: int) -> Prediction:
        """Raises AudioError (or OSError) when the file cannot be read or decoded."""
        fs, fs_path = filesystem_for(path)
        with fs.open(fs_path, "rb") as handle:
            data = handle.read()
        audio_format = path.rsplit(".", 1)[-1].lower() if "." in path else None
        decoded = decode_audio(data, audio_format, MAX_PREDICT_DURATION_S)
        windows = cut_windows(decoded.waveform, self.window_s)
        waveforms, lengths = pad_waveforms([window.waveform for window in windows])  # (W, N)
        with torch.inference_mode():
            features = compute_fbank(waveforms, lengths, self.fbank_config).to(self.device)
            output = self.model(features)  # logits (W, C), embedding (W, D)
            scores = scores_from_logits(output.logits, self.loaded.config.multi_label)
        mean_scores = scores.mean(dim=0).cpu().numpy()
        labels, values = top_k(mean_scores[None, :], k, self.loaded.config.id2label)
        return Prediction(
            path=path,
            top_labels=labels[0],
            top_scores=[float(value) for value in values[0]],
            scores=mean_scores,
            embedding=output.embedding.mean(dim=0).cpu().numpy(),
            windows=len(windows),
        )
