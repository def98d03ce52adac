"""Trains the bundled default model (ast_model/default) from scratch on synthetic sounds.

Pretrained AST weights cannot be downloaded everywhere, yet `ast-label demo` must work on a fresh
machine with nothing else; this small AST, trained on the demo's synthetic classes in about ten
minutes on a 2-core CPU, is that offline default. It is a demonstration model, not a sound tagger.

    .venv/bin/python scripts/train_default_model.py            # writes ast_model/default/

Reproducible: the data come from fixed seeds, the batches from a seeded torch.Generator, and the
weights from torch.manual_seed; rerunning with the same torch version and thread count gives the
same checkpoint. The held-out set is generated with a different seed than the training set.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ast_model.checkpoint import save_checkpoint
from ast_model.config import SINGLE_LABEL, ASTConfig
from ast_model.features import FbankConfig, compute_fbank, num_fbank_frames, pad_waveforms
from ast_model.model import ASTForAudioClassification
from pipeline.commands.synthetic import CLASS_NAMES, SAMPLE_RATE, LabeledClip, iter_dataset

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "ast_model" / "default"
REFERENCE_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"
MIN_HELD_OUT_ACCURACY = 0.95


@dataclass(frozen=True)
class TrainSettings:
    train_per_class: int = 300
    held_out_per_class: int = 100
    train_seed: int = 0
    held_out_seed: int = 1
    # Stage 1 trains on random 2.56 s crops (256 frames: 8 x 16 = 128 patches instead of 512), about
    # eight times cheaper per clip than full windows, where most of the learning happens; stage 2
    # fine-tunes the full 1024-frame model (positions tiled from stage 1) so it sees whole windows,
    # padding included, as the pipeline gives them.
    crop_frames: int = 256
    crop_epochs: int = 8
    full_epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 2e-3
    full_learning_rate: float = 3e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    threads: int = 2


def model_config() -> ASTConfig:
    """A small AST: hidden 64, 2 layers, non-overlapping 16x16 patches (8 x 64 = 512 patches).

    max_length 1024 and 128 mel bins are AST's, so the pipeline feeds it the same 10.24 s windows
    as a real AudioSet checkpoint.
    """
    return ASTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        frequency_stride=16,
        time_stride=16,
        max_length=1024,
        num_mel_bins=128,
        id2label=CLASS_NAMES,
        problem_type=SINGLE_LABEL,  # the synthetic classes are exclusive: softmax
    )


def _batches(clips: Iterator[LabeledClip], size: int) -> Iterator[list[LabeledClip]]:
    batch: list[LabeledClip] = []
    for clip in clips:
        batch.append(clip)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass(frozen=True)
class FbankSet:
    features: torch.Tensor  # (N, T, F) float16, normalised, zero-fbank padding past each clip's end
    frames: torch.Tensor  # (N,) int64: valid (non-padding) frames per clip
    labels: torch.Tensor  # (N,) int64 indices into CLASS_NAMES


def synthetic_fbank(
    per_class: int, seed: int, fbank: FbankConfig, batch_size: int = 64
) -> FbankSet:
    """Generates a class-balanced set once and computes its features once.

    float16 halves the memory of the cached set (3000 clips: 0.8 GB); normalised fbank values are
    O(1), well inside float16's precision for training.
    """
    features: list[torch.Tensor] = []
    frames: list[int] = []
    labels: list[int] = []
    for batch in _batches(iter_dataset(per_class, seed, SAMPLE_RATE), batch_size):
        waveforms, lengths = pad_waveforms([clip.waveform for clip in batch])  # (B, N), (B,)
        features.append(compute_fbank(waveforms, lengths, fbank).to(torch.float16))  # (B, T, F)
        frames.extend(min(num_fbank_frames(int(n), fbank), fbank.max_length) for n in lengths)
        labels.extend(CLASS_NAMES.index(clip.label) for clip in batch)
    return FbankSet(
        torch.cat(features),
        torch.tensor(frames, dtype=torch.int64),
        torch.tensor(labels, dtype=torch.int64),
    )


def random_crops(
    data: FbankSet, index: torch.Tensor, length: int, generator: torch.Generator
) -> torch.Tensor:
    """(B, length, F) float32 crops at random offsets inside each clip's valid frames.

    A clip shorter than the crop starts at 0 and brings its padding, as a short window does.
    """
    room = (data.frames[index] - length).clamp(min=0) + 1  # (B,) possible offsets
    offsets = (torch.rand(len(index), generator=generator) * room).long()  # (B,)
    rows = offsets[:, None] + torch.arange(length)  # (B, length)
    return data.features[index[:, None], rows].float()


def tile_time_positions(
    short: ASTForAudioClassification, config: ASTConfig
) -> ASTForAudioClassification:
    """The model for `config` (longer input) with `short`'s weights; its patch position embeddings
    repeat short's along time. The sounds are stationary: a patch's time position carries no class
    information, so repeating the learnt time pattern keeps every frequency position's meaning."""
    state = dict(short.state_dict())
    frequency, short_time = short.config.patch_grid
    _, long_time = config.patch_grid
    positions = state[
        "pos_embed"
    ]  # (1, 2 + Fp * Tp, D): CLS, distillation, frequency-major patches
    width = positions.shape[-1]
    grid = positions[:, 2:].reshape(1, frequency, short_time, width)
    repeats = math.ceil(long_time / short_time)
    tiled = grid.repeat(1, 1, repeats, 1)[:, :, :long_time]  # (1, Fp, Tp_long, D)
    state["pos_embed"] = torch.cat([positions[:, :2], tiled.reshape(1, -1, width)], dim=1)
    model = ASTForAudioClassification(config)
    model.load_state_dict(state)
    return model


def _learning_rate(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warmup = max(1, int(warmup_fraction * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(
    model: ASTForAudioClassification,
    inputs: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    epochs: int,
    learning_rate: float,
    settings: TrainSettings,
    generator: torch.Generator,
    stage: str,
) -> None:
    """AdamW with warm-up and cosine decay on cross-entropy; `inputs(index)` gives (B, T, F)."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=learning_rate, weight_decay=settings.weight_decay
    )
    steps_per_epoch = math.ceil(len(labels) / settings.batch_size)
    total = epochs * steps_per_epoch
    step = 0
    model.train()
    for epoch in range(epochs):
        started = time.monotonic()
        order = torch.randperm(len(labels), generator=generator)
        loss_sum, correct = 0.0, 0
        for first in range(0, len(labels), settings.batch_size):
            index = order[first : first + settings.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, total, learning_rate, settings.warmup_fraction)
            logits = model(inputs(index)).logits  # (B, num_labels)
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Clipping keeps the early, high-learning-rate steps of a from-scratch ViT stable.
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            loss_sum += float(loss.detach()) * len(index)
            correct += int((logits.argmax(dim=1) == labels[index]).sum())
        print(
            f"{stage} epoch {epoch + 1}/{epochs}: loss {loss_sum / len(labels):.4f}, "
            f"train accuracy {correct / len(labels):.3f}, {time.monotonic() - started:.0f} s",
            flush=True,
        )
    model.eval()


@torch.no_grad()
def predict(
    model: ASTForAudioClassification, features: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    model.eval()
    predictions = [
        model(features[first : first + batch_size].float()).logits.argmax(dim=1)
        for first in range(0, len(features), batch_size)
    ]
    return torch.cat(predictions)


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor) -> np.ndarray:
    matrix = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), dtype=np.int64)
    np.add.at(matrix, (labels.numpy(), predictions.numpy()), 1)
    return matrix  # rows: true class, columns: predicted class


def format_confusion(matrix: np.ndarray) -> str:
    lines = []
    for name, row in zip(CLASS_NAMES, matrix, strict=True):
        errors = ", ".join(
            f"{count} as {CLASS_NAMES[j]!r}"
            for j, count in enumerate(row)
            if count and CLASS_NAMES[j] != name
        )
        accuracy = row[CLASS_NAMES.index(name)] / max(1, row.sum())
        lines.append(f"| {name} | {accuracy:.1%} | {errors or '-'} |")
    return "\n".join(["| class | held-out accuracy | confused with |", "|---|---|---|", *lines])


def write_model_card(
    directory: Path,
    config: ASTConfig,
    settings: TrainSettings,
    accuracy: float,
    matrix: np.ndarray,
    train_minutes: float,
    num_params: int,
    weights_sha256: str,
    command: str,
) -> None:
    c, t = config, settings  # short names keep the template readable
    names = ", ".join(f'"{name}"' for name in CLASS_NAMES)
    card = f"""# ast-label-default: a small AST trained on synthetic sounds

The model `ast-label` uses when no other is given (`--model default`), bundled so that the
pipeline and `ast-label demo` work offline on a fresh machine. It is a demonstration model:
**for real audio use real weights**, such as the AudioSet checkpoint
[`{REFERENCE_MODEL}`](https://huggingface.co/{REFERENCE_MODEL})
(`--model {REFERENCE_MODEL}` where the hub is reachable, or a local copy of it).

## What it is

An Audio Spectrogram Transformer (`ast_model.model.ASTForAudioClassification`): hidden size
{c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads, non-overlapping \
{c.patch_size}x{c.patch_size} patches, input {c.max_length} fbank frames x {c.num_mel_bins} mel bins
(one 10.24 s window at 16 kHz, as AST-base), {num_params:,} parameters, single-label \
(softmax scores)
over {c.num_labels} AudioSet class names: {names}.

Features: Kaldi fbank as `ASTFeatureExtractor` computes it, normalised with the AudioSet
statistics (mean -4.2677393, std 4.5689974). Weights: `model.safetensors`, sha256
`{weights_sha256}`.

## Files

- `config.json`: the Hugging Face `ASTConfig`, label names in `id2label`.
- `model.safetensors`: the weights, under `transformers`' names.
- `preprocessor_config.json`: the `ASTFeatureExtractor` settings (16 kHz, 128 mel bins, 1024
  frames, AudioSet mean and std, normalised), so that `transformers` loads the folder as it loads
  a hub checkpoint, in its own audio-classification pipeline too:

      from transformers import pipeline
      classify = pipeline("audio-classification", model="ast_model/default")
      classify({{"raw": waveform, "sampling_rate": 16000}})  # [{{"label": ..., "score": ...}}, ...]

  (`ASTFeatureExtractor` reads only the first 10.24 s of a clip; `ast-label predict` labels every
  window of a longer file.)

## How it was made

    {command}

Trained from random initialisation on {t.train_per_class * c.num_labels} synthetic clips \
({t.train_per_class} per class, seed {t.train_seed})
from `pipeline/synthetic.py`: random frequencies, sweep and repetition rates, levels
(-40 to -12 dBFS RMS; "Silence" -90 to -60 dBFS or digital zero), durations 1 to 10.24 s, and a
room tone of random colour at 15-40 dB SNR. Cross-entropy, AdamW (weight decay
{t.weight_decay}, warm-up then cosine decay), batch {t.batch_size}, in two stages:

1. {t.crop_epochs} epochs on random {t.crop_frames}-frame (2.56 s) crops with a \
{t.crop_frames}-frame copy of the
   model, lr {t.learning_rate}: a quarter of the patches, about eight times cheaper per clip;
2. {t.full_epochs} epoch(s) on whole {c.max_length}-frame inputs, lr {t.full_learning_rate}, \
the patch position
   embeddings first repeated along time from stage 1.

{train_minutes:.1f} minutes wall time in all, data generation included, on a shared 2-core CPU
({t.threads} torch threads). The script is seeded throughout; the same torch version and \
thread count
give the same weights.

## Held-out accuracy

**{accuracy:.1%}** on {t.held_out_per_class * c.num_labels} clips generated with another seed \
({t.held_out_seed}), {t.held_out_per_class} per class:

{format_confusion(matrix)}

## Limits

- It knows only the synthetic sounds above. Real recordings (speech, music, animals, machines)
  get confident but meaningless labels: softmax scores always sum to one over these classes.
- The names follow the AudioSet ontology, but each class is what `pipeline/synthetic.py` makes of
  it, not AudioSet's variety: "Static" is random crackle over hiss, "Mains hum" is 50/60 Hz with
  harmonics, "Harmonic" one to three harmonic tones, "Clicking" a regular click train.
- Trained on 16 kHz clips of 1 to 10.24 s; the pipeline labels longer files window by window.
"""
    (directory / "README.md").write_text(card, encoding="utf-8")


def fit(
    train_set: FbankSet, config: ASTConfig, settings: TrainSettings
) -> ASTForAudioClassification:
    """Stage 1 on short crops, then stage 2 on full windows (see TrainSettings)."""
    generator = torch.Generator().manual_seed(settings.train_seed)  # batch order and crop offsets
    short = ASTForAudioClassification(replace(config, max_length=settings.crop_frames))
    train(
        short,
        lambda index: random_crops(train_set, index, settings.crop_frames, generator),
        train_set.labels,
        settings.crop_epochs,
        settings.learning_rate,
        settings,
        generator,
        stage=f"{settings.crop_frames}-frame crops",
    )
    model = tile_time_positions(short, config)
    train(
        model,
        lambda index: train_set.features[index].float(),
        train_set.labels,
        settings.full_epochs,
        settings.full_learning_rate,
        settings,
        generator,
        stage=f"full {config.max_length}-frame windows",
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="checkpoint folder to write"
    )
    defaults = TrainSettings()
    parser.add_argument("--train-per-class", type=int, default=defaults.train_per_class)
    parser.add_argument("--held-out-per-class", type=int, default=defaults.held_out_per_class)
    parser.add_argument("--crop-epochs", type=int, default=defaults.crop_epochs)
    parser.add_argument("--full-epochs", type=int, default=defaults.full_epochs)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument(
        "--min-accuracy",
        type=float,
        default=MIN_HELD_OUT_ACCURACY,
        help="write nothing when the held-out accuracy is lower",
    )
    args = parser.parse_args()
    settings = replace(
        defaults,
        train_per_class=args.train_per_class,
        held_out_per_class=args.held_out_per_class,
        crop_epochs=args.crop_epochs,
        full_epochs=args.full_epochs,
        threads=args.threads,
    )

    started = time.monotonic()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.train_seed)  # initial weights
    config = model_config()
    fbank = FbankConfig.for_model(config)

    train_set = synthetic_fbank(settings.train_per_class, settings.train_seed, fbank)
    held_out = synthetic_fbank(settings.held_out_per_class, settings.held_out_seed, fbank)
    print(
        f"features: {len(train_set.labels)} training and {len(held_out.labels)} held-out clips "
        f"in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    model = fit(train_set, config, settings)
    train_minutes = (time.monotonic() - started) / 60

    matrix = confusion_matrix(held_out.labels, predict(model, held_out.features))
    accuracy = float(np.trace(matrix) / matrix.sum())
    print(
        f"held-out accuracy: {accuracy:.4f} on {matrix.sum()} clips (seed {settings.held_out_seed})"
    )
    print(format_confusion(matrix))

    if accuracy < args.min_accuracy:
        # Never replace a good bundled model with a worse one.
        raise SystemExit(
            f"held-out accuracy {accuracy:.1%} is below {args.min_accuracy:.0%}: nothing written"
        )
    args.output.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, config, args.output)
    weights_sha256 = hashlib.sha256((args.output / "model.safetensors").read_bytes()).hexdigest()
    num_params = sum(p.numel() for p in model.parameters())
    write_model_card(
        args.output,
        config,
        settings,
        accuracy,
        matrix,
        train_minutes,
        num_params,
        weights_sha256,
        command=shlex.join([".venv/bin/python", "scripts/train_default_model.py", *sys.argv[1:]]),
    )
    print(f"wrote {args.output}; {(time.monotonic() - started) / 60:.1f} minutes in all")


if __name__ == "__main__":
    main()
