"""How the fbank crosses from a read task to a classifier actor: a numpy array in the classifier's
input dtype (rows.FEATURE_DTYPES). numpy has no bfloat16, so bf16 travels as its raw 16 bits and
becomes torch.bfloat16 again on the other side, bit for bit and without a copy."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def fbank_to_numpy(fbank: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 fbank -> the numpy form of the classifier's input dtype (bf16 as raw uint16 bits)."""
    if dtype == "float32":
        return fbank.numpy()
    if dtype == "float16":
        return fbank.half().numpy()
    return fbank.bfloat16().view(torch.int16).numpy().view(np.uint16)


def fbank_to_torch(fbank: np.ndarray) -> torch.Tensor:
    """The inverse of fbank_to_numpy, without a copy: (B, T, F) float32, float16 or bfloat16."""
    with warnings.catch_warnings():
        # Batches from Ray's object store are read-only; the model only reads its input.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if fbank.dtype == np.uint16:
            return torch.from_numpy(fbank.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(fbank)
