"""The demo's second act: sounds the bundled model never heard (Siren, Doorbell, Engine), which it
can only call by the nearest class it knows, and a head that learns them from a few examples.

`ast-label demo` writes a shard of such clips into its corpus (so the run labels them, wrongly,
as the model must) and a folder of examples, one subfolder per class; its report then shows the
commands that train a head on the examples, relabel the output with it, and look:

    ast-label head train ast-label-demo/head-examples --output ast-label-demo/head
    ast-label relabel ast-label-demo/labels --head ast-label-demo/head \
        --output ast-label-demo/labels-head
    ast-label inspect ast-label-demo/labels-head --label Siren
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.commands.synthetic import (
    CLASS_NAMES,
    NOVEL_CLASS_NAMES,
    SAMPLE_RATE,
    generate_clip,
)

NOVEL_SHARD = "shard-novel.tar"
CLIPS_PER_CLASS = 6  # in the corpus: what the head must find
EXAMPLES_PER_CLASS = 16  # in head-examples/<class>/: what it learns from (2 to 8 seconds each)
# A head tells its classes apart from what else the corpus holds only when it has seen that too:
# "Other" examples are the sounds the bundled model knows, five of each.
OTHER = "Other"
OTHER_PER_KNOWN_CLASS = 5
EXAMPLE_DURATION_S = (2.0, 8.0)
TAR_MTIME = 1_700_000_000  # a fixed mtime keeps the shard's bytes reproducible


def write_novel_shard(corpus_dir: Path, seed: int = 1) -> dict[tuple[str, str], str]:
    """The corpus's shard of novel sounds; returns (shard file name, key) -> its class."""
    rng = np.random.default_rng(seed)
    truth = {}
    with tarfile.open(corpus_dir / NOVEL_SHARD, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, label in enumerate(np.repeat(NOVEL_CLASS_NAMES, CLIPS_PER_CLASS)):
            key = f"novel-{index:03d}"
            clip = generate_clip(str(label), rng, SAMPLE_RATE)
            metadata = {"label": str(label), "novel": True}
            for name, data in ((f"{key}.flac", _flac(clip)), (f"{key}.json", _json(metadata))):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
                tar.addfile(info, io.BytesIO(data))
            truth[(NOVEL_SHARD, key)] = str(label)
    return truth


def write_head_examples(directory: Path, seed: int = 2) -> Path:
    """head-examples/<class>/example-NN.wav: a head's training set, one subfolder per class (the
    novel ones and "Other")."""
    rng = np.random.default_rng(seed)
    examples = {label: [label] * EXAMPLES_PER_CLASS for label in NOVEL_CLASS_NAMES}
    examples[OTHER] = [label for label in CLASS_NAMES for _ in range(OTHER_PER_KNOWN_CLASS)]
    for folder_name, sounds in examples.items():
        folder = directory / folder_name
        folder.mkdir(parents=True, exist_ok=True)
        for index, sound in enumerate(sounds):
            duration_s = float(rng.uniform(*EXAMPLE_DURATION_S))
            clip = generate_clip(sound, rng, SAMPLE_RATE, duration_s)
            sf.write(folder / f"example-{index:02d}.wav", clip, SAMPLE_RATE, subtype="PCM_16")
    return directory


def recipe(output_dir: Path) -> list[str]:
    """The report's lines that show what a head adds, with the commands that train, apply and
    inspect it."""
    examples, head = output_dir / "head-examples", output_dir / "head"
    labels, relabeled = output_dir / "labels", output_dir / "labels-head"
    return [
        f"Your own labels: {len(NOVEL_CLASS_NAMES) * CLIPS_PER_CLASS} clips in {NOVEL_SHARD} are "
        f"{', '.join(NOVEL_CLASS_NAMES)}, sounds the bundled model never heard (it calls them by "
        f"the nearest class it knows). A head learns them, and {OTHER!r} for the rest, from the "
        f"examples in {examples}/<class>/. The bundled model's labels:",
        f"  ast-label head train {examples} --output {head}",
        f"  ast-label relabel {labels} --head {head} --output {relabeled}",
        f"  ast-label inspect {relabeled} --label Siren",
    ]


def _flac(clip: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, clip, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def _json(metadata: dict) -> bytes:
    return json.dumps(metadata).encode()
