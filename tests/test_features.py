"""Batched fbank == torchaudio's kaldi fbank == transformers' ASTFeatureExtractor.

Tolerance: max abs difference <= 1e-4 on the normalised features ((fbank - mean) / (2 * std)),
the contract in DESIGN.md. compute_fbank repeats kaldi's float32 operations, so in practice the
difference is ~1e-7; a real regression (a float64 filterbank, a reordered preemphasis) shows up
as 1e-4..1e-3 in the lowest mel bins, which hold a millionth of a frame's energy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ast_model.config import ASTConfig, FbankConfig
from ast_model.features import compute_fbank, num_fbank_frames, pad_waveforms

SAMPLE_RATE = 16000
TOLERANCE = 1e-4
CONFIG = FbankConfig()
# ASTFeatureExtractor's padding: a zero fbank row, normalised in float32.
PADDING_VALUE = float((np.float32(0.0) - CONFIG.mean) / (CONFIG.std * 2))


def make_clip(seconds: float, seed: int) -> np.ndarray:
    """Audio-like float32 in [-1, 1]: a chord, a rising chirp, noise and a small DC offset."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    chord = sum(0.15 * np.sin(2 * math.pi * f * t + rng.uniform(0, 6)) for f in (220, 330, 1250))
    chirp = 0.2 * np.sin(2 * math.pi * (100 + 300 * t) * t)
    noise = 0.05 * rng.standard_normal(t.shape)
    return (chord + chirp + noise + 0.01).astype(np.float32)


def kaldi_reference(clip: np.ndarray, config: FbankConfig = CONFIG) -> torch.Tensor:
    """torchaudio's kaldi fbank with AST's settings, padded/truncated and normalised like HF."""
    from torchaudio.compliance import kaldi

    fbank = kaldi.fbank(
        torch.from_numpy(clip)[None],
        sample_frequency=config.sample_rate,
        window_type="hanning",
        num_mel_bins=config.num_mel_bins,
        htk_compat=True,
        use_energy=False,
        dither=0.0,
        frame_shift=10,
    )[: config.max_length]
    fbank = torch.nn.functional.pad(fbank, (0, 0, 0, config.max_length - fbank.shape[0]))
    return (fbank - config.mean) / (2 * config.std)


def hf_reference(clips: list[np.ndarray], **settings) -> torch.Tensor:
    from transformers import ASTFeatureExtractor

    extractor = ASTFeatureExtractor(**settings)
    return extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_values"]


@pytest.mark.parametrize("seconds", [0.5, 10.24, 15.0])
def test_fbank_of_one_clip_matches_torchaudio_kaldi_and_ast_feature_extractor(seconds: float):
    clip = make_clip(seconds, seed=1)
    ours = compute_fbank(*pad_waveforms([clip]), CONFIG)[0]

    assert ours.shape == (1024, 128) and ours.dtype == torch.float32
    assert (ours - kaldi_reference(clip)).abs().max() <= TOLERANCE
    assert (ours - hf_reference([clip])[0]).abs().max() <= TOLERANCE


def test_mixed_length_batch_matches_ast_feature_extractor_clip_by_clip():
    clips = [make_clip(s, seed=i) for i, s in enumerate((0.5, 10.24, 15.0, 3.3, 0.03))]
    ours = compute_fbank(*pad_waveforms(clips), CONFIG)

    reference = hf_reference(clips)
    assert ours.shape == reference.shape == (5, 1024, 128)
    assert (ours - reference).abs().max() <= TOLERANCE


def test_padding_after_a_clip_never_leaks_into_its_frames():
    clip = make_clip(2.0, seed=3)
    alone = compute_fbank(*pad_waveforms([clip]), CONFIG)
    # The same clip in a longer batch row whose tail holds loud noise instead of zeros.
    waveforms = torch.randn(1, 5 * SAMPLE_RATE)
    waveforms[0, : len(clip)] = torch.from_numpy(clip)
    padded = compute_fbank(waveforms, torch.tensor([len(clip)]), CONFIG)

    assert torch.equal(alone, padded)


def test_rows_past_a_clip_are_a_zero_fbank_row_normalised():
    clip = make_clip(0.5, seed=4)
    features = compute_fbank(*pad_waveforms([clip]), CONFIG)[0]
    frames = num_fbank_frames(len(clip), CONFIG)

    assert frames == 48
    assert torch.all(features[frames:] == PADDING_VALUE)  # exactly, not within a tolerance
    assert torch.all(features[frames:] == hf_reference([clip])[0, frames:])
    assert not torch.any(features[frames - 1] == PADDING_VALUE)


def test_clip_shorter_than_one_frame_is_all_padding():
    assert [num_fbank_frames(n, CONFIG) for n in (0, 399, 400, 559, 560)] == [0, 0, 1, 1, 2]
    features = compute_fbank(torch.ones(2, 399), torch.tensor([399, 0]), CONFIG)

    assert torch.all(features == PADDING_VALUE)


def test_clips_longer_than_max_length_are_truncated_like_ast_feature_extractor():
    config = FbankConfig.for_model(ASTConfig(max_length=100, num_mel_bins=64), mean=-3.0, std=4.0)
    clips = [make_clip(2.0, seed=5), make_clip(0.7, seed=6)]
    ours = compute_fbank(*pad_waveforms(clips), config)

    reference = hf_reference(clips, num_mel_bins=64, max_length=100, mean=-3.0, std=4.0)
    assert ours.shape == (2, 100, 64)
    assert (ours - reference).abs().max() <= TOLERANCE


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="lengths"):
        compute_fbank(torch.zeros(2, 1000), torch.tensor([1000]), CONFIG)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fbank_on_cuda_matches_cpu():
    clips = [make_clip(s, seed=i) for i, s in enumerate((10.24, 4.0, 0.2))]
    waveforms, lengths = pad_waveforms(clips)
    on_gpu = compute_fbank(waveforms.cuda(), lengths.cuda(), CONFIG)

    assert on_gpu.device.type == "cuda"
    # cuFFT rounds differently from pocketfft; same float32 noise budget as the reference.
    assert (on_gpu.cpu() - compute_fbank(waveforms, lengths, CONFIG)).abs().max() <= TOLERANCE
