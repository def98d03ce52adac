"""Clips/s of our batched fbank vs torchaudio's kaldi fbank (clip by clip) vs ASTFeatureExtractor.

    .venv/bin/python benchmarks/bench_features.py [--clips 64] [--batch 32] [--threads 1]

All three see the same 10 s clips; each figure is the best of --repeats runs (the machines are
shared, so the best run is the least disturbed one). Prints the ratio against ASTFeatureExtractor
measured in the same run (goal: >= 5x on the 2-core CPU) and checks the features agree.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from timing import best_seconds

from ast_model.features import FbankConfig, compute_fbank

SAMPLE_RATE = 16000


def make_clips(count: int, seconds: float) -> np.ndarray:
    """(count, N) float32 audio-like clips: tones, a chirp and noise."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tones = rng.uniform(100, 4000, size=(count, 3))
    clips = sum(0.15 * np.sin(2 * np.pi * tones[:, i, None] * t) for i in range(3))
    clips += 0.2 * np.sin(2 * np.pi * (100 + 300 * t) * t) + 0.05 * rng.standard_normal(
        (count, t.size)
    )
    return clips.astype(np.float32)


def batched_fbank(
    waveforms: torch.Tensor, lengths: torch.Tensor, batch: int, config: FbankConfig
) -> torch.Tensor:
    """(B, N) clips and (B,) lengths -> (B, T, F) fbank, computed `batch` clips at a time (as a
    feature actor sees them) on the waveforms' device."""
    with torch.inference_mode():
        return torch.cat(
            [
                compute_fbank(waveforms[i : i + batch], lengths[i : i + batch], config)
                for i in range(0, len(waveforms), batch)
            ]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)"
    )
    args = parser.parse_args()
    if args.threads:
        # Ray gives each 1-CPU actor OMP_NUM_THREADS=1: --threads 1 is the pipeline's situation.
        torch.set_num_threads(args.threads)

    from torchaudio.compliance import kaldi
    from transformers import ASTFeatureExtractor

    config = FbankConfig()
    clips = make_clips(args.clips, args.seconds)
    waveforms = torch.from_numpy(clips)
    lengths = torch.full((args.clips,), clips.shape[1])
    batches = [slice(i, i + args.batch) for i in range(0, args.clips, args.batch)]
    extractor = ASTFeatureExtractor()

    def ours(device: str = "cpu") -> torch.Tensor:
        return batched_fbank(waveforms.to(device), lengths.to(device), args.batch, config)

    def torchaudio_per_clip() -> None:
        for clip in waveforms:
            kaldi.fbank(
                clip[None],
                sample_frequency=SAMPLE_RATE,
                window_type="hanning",
                num_mel_bins=128,
                htk_compat=True,
                use_energy=False,
                dither=0.0,
            )

    def hf() -> list[np.ndarray]:
        return [
            extractor(list(clips[b]), sampling_rate=SAMPLE_RATE, return_tensors="np")[
                "input_values"
            ]
            for b in batches
        ]

    print(
        f"{args.clips} clips of {args.seconds:g} s, batch {args.batch}, "
        f"{torch.get_num_threads()} torch threads, best of {args.repeats}"
    )
    difference = float(np.abs(ours().numpy() - np.concatenate(hf())).max())
    print(f"max |ours - ASTFeatureExtractor| = {difference:.2e} (contract: <= 1e-4)")

    rates = {
        "ours (batched, CPU)": args.clips / best_seconds(ours, args.repeats),
        "torchaudio kaldi.fbank per clip": args.clips
        / best_seconds(torchaudio_per_clip, args.repeats),
        "ASTFeatureExtractor": args.clips / best_seconds(hf, args.repeats),
    }
    if torch.cuda.is_available():
        rates["ours (batched, CUDA, incl. host->device copy)"] = args.clips / best_seconds(
            lambda: ours("cuda"), args.repeats, torch.cuda.synchronize
        )
    reference = rates["ASTFeatureExtractor"]
    for name, rate in rates.items():
        print(f"{name:48s} {rate:9.1f} clips/s  {rate / reference:6.2f}x ASTFeatureExtractor")


if __name__ == "__main__":
    main()
