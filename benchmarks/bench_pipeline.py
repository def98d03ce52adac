"""End-to-end benchmark of `ast-label run` against a plain transformers loop, and peak memory.

    .venv/bin/python benchmarks/bench_pipeline.py --size tiny --clips 200
    .venv/bin/python benchmarks/bench_pipeline.py --size base --clips 16 --no-memory

Generates a corpus of 10 s FLAC clips in WebDataset tar shards, then measures on the same files:
- baseline: soundfile + torchaudio resample + transformers' ASTFeatureExtractor and
  ASTForAudioClassification, one file at a time in this process (what a user would write first);
- ast-label: `ast-label run` in a fresh process (local Ray started by it, so its start-up counts);
- peak memory of the whole run (the driver and every Ray process it started, summed PSS) at 1x and
  10x the corpus: streaming means the 10x run needs about the same memory.
Prints clips/s, audio-hours/s and the ratios. Timings are only comparable within one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

HF_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(HF_OFFLINE)

SIZES = {
    # hidden, layers, heads, mlp, strides: "tiny" keeps the pipeline's own costs visible.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        frequency_stride=16,
        time_stride=16,
    ),
    "base": dict(),  # AST-base as published: 768 hidden, 12 layers, strides 10
}
CLIP_S = 10.0
CLIPS_PER_SHARD = 50


def write_checkpoint(size: str, directory: Path) -> Path:
    from transformers import ASTConfig, ASTForAudioClassification

    labels = [f"label {i}" for i in range(527)]
    config = ASTConfig(
        **SIZES[size],
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(0)
    ASTForAudioClassification(config).eval().save_pretrained(directory)
    return directory


def write_corpus(directory: Path, clips: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Tar shards of 10 s mono 16 kHz FLAC clips (tones in noise); returns each clip's bytes."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    clips_bytes = []
    t = np.arange(int(CLIP_S * 16_000)) / 16_000
    for index in range(clips):
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.05 * rng.standard_normal(
            t.size
        )
        buffer = io.BytesIO()
        sf.write(buffer, wave.astype(np.float32), 16_000, format="FLAC")
        clips_bytes.append((f"clip-{index:06d}.flac", buffer.getvalue()))
    for shard_index, start in enumerate(range(0, clips, CLIPS_PER_SHARD)):
        with tarfile.open(directory / f"shard-{shard_index:06d}.tar", "w") as tar:
            for name, data in clips_bytes[start : start + CLIPS_PER_SHARD]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return clips_bytes


def baseline_seconds(checkpoint: Path, clips: list[tuple[str, bytes]]) -> float:
    import torchaudio
    from transformers import ASTFeatureExtractor, ASTForAudioClassification

    extractor = ASTFeatureExtractor()
    model = ASTForAudioClassification.from_pretrained(checkpoint).eval()
    started = time.perf_counter()
    for _, data in clips:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        mono = torch.from_numpy(wave.mean(axis=1))
        if rate != 16_000:
            mono = torchaudio.functional.resample(mono, rate, 16_000)
        inputs = extractor(mono.numpy(), sampling_rate=16_000, return_tensors="pt")
        with torch.inference_mode():
            logits = model(**inputs).logits
        torch.sigmoid(logits)
    return time.perf_counter() - started


def session_pss_bytes(session_id: int) -> int:
    """Summed proportional set size of every process in a session (shared pages counted once)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) != session_id:
                continue
            for line in (stat.parent / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


def run_ast_label(corpus: Path, output: Path, checkpoint: Path, batch_size: int) -> dict:
    command = [
        str(Path(sys.executable).with_name("ast-label")),
        "run",
        str(corpus),
        "--output",
        str(output),
        "--model",
        str(checkpoint),
        "--batch-size",
        str(batch_size),
    ]
    env = {**os.environ, **HF_OFFLINE, "RAY_ADDRESS": ""}
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0

    def sample() -> None:
        nonlocal peak
        while process.poll() is None:
            peak = max(peak, session_pss_bytes(process.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"ast-label run failed:\n{stderr[-3000:]}")
    summary = json.loads((output / "_summary.json").read_text())
    return {"wall_s": wall, "peak_pss_gib": peak / 2**30, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-memory", action="store_true", help="Skip the 10x memory run.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ast-label-bench-") as scratch:
        root = Path(scratch)
        checkpoint = write_checkpoint(args.size, root / "model")
        clips = write_corpus(root / "corpus", args.clips)
        audio_hours = len(clips) * CLIP_S / 3600
        base_s = baseline_seconds(checkpoint, clips)
        ours = run_ast_label(root / "corpus", root / "out", checkpoint, args.batch_size)
        print(
            f"model {args.size}, {len(clips)} clips of {CLIP_S:g} s, "
            f"{torch.get_num_threads()} torch threads"
        )
        print(
            f"transformers loop : {base_s:8.1f} s  {len(clips) / base_s:7.2f} clips/s  "
            f"{audio_hours / base_s * 3600:8.1f} audio-s/s"
        )
        print(
            f"ast-label run     : {ours['wall_s']:8.1f} s  "
            f"{len(clips) / ours['wall_s']:7.2f} clips/s  "
            f"{audio_hours / ours['wall_s'] * 3600:8.1f} audio-s/s  (incl. Ray start-up)"
        )
        print(f"ratio ast-label / transformers (clips/s): {base_s / ours['wall_s']:.2f}x")
        print(f"peak memory 1x ({len(clips)} clips): {ours['peak_pss_gib']:.2f} GiB PSS")
        if not args.no_memory:
            write_corpus(root / "corpus10", args.clips * 10, seed=1)
            tenfold = run_ast_label(root / "corpus10", root / "out10", checkpoint, args.batch_size)
            print(
                f"peak memory 10x ({args.clips * 10} clips): {tenfold['peak_pss_gib']:.2f} GiB PSS "
                f"({tenfold['peak_pss_gib'] / ours['peak_pss_gib']:.2f}x of 1x); "
                f"{args.clips * 10 / tenfold['wall_s']:.2f} clips/s"
            )


if __name__ == "__main__":
    main()
