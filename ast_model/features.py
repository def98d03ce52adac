"""Batched Kaldi log-mel filterbanks, normalised as AST expects.

The same numbers as transformers' ASTFeatureExtractor (which calls torchaudio.compliance.kaldi.fbank
one clip at a time with kaldi's defaults and a Hann window), computed for a whole batch at once in
float32 on any device. Kaldi settings fixed by AST: 25 ms Hann ("hanning") frames every 10 ms,
snip_edges (only frames that fit entirely), per-frame DC removal, preemphasis 0.97, no dither,
512-point power spectrum, 128 triangular mel bins from 20 Hz to Nyquist, log floored at float32 eps,
no energy column. The waveform is used as given (floats in [-1, 1]): ASTFeatureExtractor does not
rescale to 16-bit integers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

# FbankConfig lives in config.py (torch-free); importing it from here works too.
from ast_model.config import FbankConfig

PREEMPHASIS = 0.97
LOW_FREQ_HZ = 20.0
LOG_FLOOR = torch.finfo(torch.float32).eps  # kaldi's epsilon: log(max(energy, eps))
_FRAMES_PER_CHUNK = 4096  # ~8 MiB of float32 (512, frames) intermediates per step
_FILTERS_PER_BAND = 8


def pad_waveforms(clips: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips of any lengths (1-D numpy arrays or tensors) -> compute_fbank's input: (B, N) float32
    zero-padded to the longest clip, and (B,) int64 lengths."""
    lengths = torch.tensor([len(clip) for clip in clips], dtype=torch.int64)
    waveforms = torch.zeros(len(clips), int(lengths.max()) if len(clips) else 0)  # (B, N)
    for row, clip in zip(waveforms, clips, strict=True):
        row[: len(clip)] = torch.as_tensor(clip, dtype=torch.float32)
    return waveforms, lengths


def num_fbank_frames(num_samples: int, config: FbankConfig) -> int:
    """Frames kaldi computes (snip_edges): 0 when shorter than one frame (400 samples)."""
    if num_samples < config.window_size:
        return 0
    return 1 + (num_samples - config.window_size) // config.window_shift


def compute_fbank(
    waveforms: torch.Tensor, lengths: torch.Tensor, config: FbankConfig
) -> torch.Tensor:
    """waveforms (B, N) float 16 kHz mono, zero-padded; lengths (B,) valid samples of each clip.

    Returns (B, max_length, num_mel_bins) float32 on the waveforms' device, normalised as
    (fbank - mean) / (2 * std). Each clip's frames come from its own samples only; rows past a
    clip's last frame are padding, which (as in ASTFeatureExtractor) is a zero fbank row before
    normalisation. Clips longer than max_length frames are truncated.
    """
    if waveforms.ndim != 2 or lengths.shape != waveforms.shape[:1]:
        raise ValueError(
            f"expected waveforms (B, N) and lengths (B,), got {tuple(waveforms.shape)} "
            f"and {tuple(lengths.shape)}"
        )
    batch, num_samples = waveforms.shape
    size, shift = config.window_size, config.window_shift
    device = waveforms.device
    lengths = lengths.to(device=device, dtype=torch.long).clamp(0, num_samples)
    # (B,) frames per clip; frame f spans samples [f * shift, f * shift + size), so a clip's
    # frames never read past its own length and padding cannot leak into them.
    frame_counts = torch.where(
        lengths >= size, (lengths - size).div(shift, rounding_mode="floor") + 1, 0
    ).clamp(max=config.max_length)

    # Only the samples that the first max_length frames can reach.
    needed = (config.max_length - 1) * shift + size
    audio = waveforms[:, :needed].float()
    if audio.shape[1] < size:  # no clip has a whole frame; keep shapes valid
        audio = torch.nn.functional.pad(audio, (0, size - audio.shape[1]))
    frames = audio.unfold(1, size, shift)  # (B, M, 400) strided view, M <= max_length
    num_frames = frames.shape[1]

    out = torch.empty(batch, config.max_length, config.num_mel_bins, device=device)
    # A few clips at a time keep the (512, frames) intermediates small enough for the CPU caches.
    clips_per_chunk = max(1, _FRAMES_PER_CHUNK // num_frames)
    for first in range(0, batch, clips_per_chunk):
        chunk = slice(first, first + clips_per_chunk)
        fbank = out[chunk, :num_frames]  # (b, M, F) view
        torch.sub(_log_mel(frames[chunk], config), config.mean, out=fbank)
        fbank.div_(2.0 * config.std)
    # Padding: a zero fbank row normalised in float32, exactly as ASTFeatureExtractor's rows.
    padding_row = float((torch.zeros(()) - config.mean) / (2.0 * config.std))
    out[:, num_frames:] = padding_row
    past_end = torch.arange(num_frames, device=device) >= frame_counts[:, None]  # (B, M)
    out[:, :num_frames].masked_fill_(past_end[..., None], padding_row)
    return out  # (B, max_length, F)


def _log_mel(frames: torch.Tensor, config: FbankConfig) -> torch.Tensor:
    """(b, M, 400) raw frames -> (b, M, F) kaldi log-mel energies (a view of an (F, b, M) tensor).

    Frames are laid out sample-major, (400, b * M): every step below is then a plain 2-D
    operation over all frames of the chunk, and the FFT runs along dim 0.
    The time-domain steps repeat kaldi's float32 operations one for one: the lowest mel bins of
    real audio hold ~1e-6 of a frame's energy, so even 1-ulp differences in the frame samples
    show up there as ~1e-3 differences in log energy.
    """
    size, fft_size, device = config.window_size, config.fft_size, frames.device
    clips, num_frames = frames.shape[:2]
    # DC offset, per frame; the mean is taken frame-major, as kaldi sums.
    centred = torch.empty(size, clips, num_frames, device=device)  # (400, b, M)
    torch.sub(frames.permute(2, 0, 1), frames.mean(dim=-1).unsqueeze(0), out=centred)
    centred = centred.view(size, -1)  # (400, b * M)
    padded = torch.empty(fft_size, centred.shape[1], device=device)  # (512, b * M)
    padded[size:] = 0.0
    # Preemphasis inside each frame; the first sample is its own predecessor (kaldi's choice).
    emphasised = padded[1:size]
    torch.mul(centred[:-1], PREEMPHASIS, out=emphasised)
    torch.sub(centred[1:], emphasised, out=emphasised)
    padded[0] = centred[0] - PREEMPHASIS * centred[0]
    padded[:size] *= _hann_window(size, device)[:, None]
    spectrum = torch.view_as_real(torch.fft.rfft(padded, dim=0)).square_()  # (K, b * M, 2)
    power = spectrum[..., 0] + spectrum[..., 1]  # (K, b * M) = re^2 + im^2
    # Each triangular filter covers a few neighbouring FFT bins: multiplying band by band skips
    # the ~95% zeros of the dense (K, F) filterbank.
    energies = torch.empty(config.num_mel_bins, power.shape[1], device=device)  # (F, b * M)
    for rows, filters, weights in _mel_bands(
        config.num_mel_bins, fft_size, config.sample_rate, device
    ):
        torch.mm(weights, power[rows], out=energies[filters])
    energies.clamp_min_(LOG_FLOOR).log_()
    return energies.view(-1, clips, num_frames).permute(1, 2, 0)  # (b, M, F)


@functools.lru_cache(maxsize=16)
def _hann_window(size: int, device: torch.device) -> torch.Tensor:
    return torch.hann_window(size, periodic=False, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=16)
def _mel_bands(
    num_bins: int, fft_size: int, sample_rate: int, device: torch.device
) -> tuple[tuple[slice, slice, torch.Tensor], ...]:
    """The filterbank cut into groups of neighbouring filters: (FFT-bin rows the group touches,
    its filters, their (filters, rows) weights)."""
    banks = _mel_banks(num_bins, fft_size, sample_rate)  # (K, F)
    bands = []
    for first in range(0, num_bins, _FILTERS_PER_BAND):
        filters = slice(first, min(first + _FILTERS_PER_BAND, num_bins))
        used = banks[:, filters].gt(0).any(dim=1).nonzero().flatten()
        rows = slice(int(used.min()), int(used.max()) + 1) if used.numel() else slice(0, 0)
        bands.append((rows, filters, banks[rows, filters].T.contiguous().to(device)))
    return tuple(bands)


def _mel_banks(num_bins: int, fft_size: int, sample_rate: int) -> torch.Tensor:
    """(fft_size // 2 + 1, num_bins) kaldi triangular filters; the Nyquist row is zero.

    Built in float32 with kaldi's own order of operations: a filter's small edge weights are
    sensitive enough that a float64 build moves loud bins' log energy by ~1e-4.
    """

    def mel(hz: torch.Tensor) -> torch.Tensor:
        return 1127.0 * (1.0 + hz / 700.0).log()

    mel_low = 1127.0 * math.log(1.0 + LOW_FREQ_HZ / 700.0)
    mel_high = 1127.0 * math.log(1.0 + sample_rate / 2 / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins, dtype=torch.float32)[:, None]  # (num_bins, 1)
    left = mel_low + index * delta
    center = mel_low + (index + 1.0) * delta
    right = mel_low + (index + 2.0) * delta
    # Kaldi leaves the Nyquist bin out of every filter (a zero row is appended below).
    bin_mel = mel(sample_rate / fft_size * torch.arange(fft_size // 2, dtype=torch.float32))
    up = (bin_mel - left) / (center - left)
    down = (right - bin_mel) / (right - center)
    banks = torch.minimum(up, down).clamp_min(0.0)  # (num_bins, fft_size // 2)
    return torch.nn.functional.pad(banks, (0, 1)).T  # (fft_size // 2 + 1, num_bins)
