"""`ast-label head train`: heads on the bundled model's embeddings of audio generated here.

The bundled model (10 synthetic classes, hidden 64) embeds clips that pipeline.commands.synthetic
makes; examples are label folders or manifests of real WAV files and tar shards, labeled in this
process, on the session's real Ray, or read back from a real output.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from audio_corpus import encode, write_tar_shard
from click.testing import CliRunner
from labels_output import synthetic_output
from safetensors.numpy import load_file

from pipeline.commands.cli import main
from pipeline.commands.synthetic import SAMPLE_RATE, generate_clip
from pipeline.heads.head import load_head
from pipeline.heads.train import TrainConfig, train_head
from pipeline.settings import LabelingOptions

SEPARABLE = ("Sine wave", "White noise", "Clicking")
PROBABILITY_TOLERANCE = 1e-5  # float32 weights and embeddings against scikit-learn's float64
SAME_AUDIO_TOLERANCE = 1e-3  # a head fitted on run's and on predict's embeddings of one audio


def write_clip(path: Path, sound: str, seed: int, duration_s: float = 2.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, generate_clip(sound, rng, duration_s=duration_s), SAMPLE_RATE)
    return path


def label_folders(root: Path, sounds: dict[str, str], files: int, seed: int) -> Path:
    """root/<label>/<i>.wav: `files` clips per label, of the synthetic sound it maps to."""
    for number, (label, sound) in enumerate(sounds.items()):
        for index in range(files):
            write_clip(root / label / f"{index:02d}.wav", sound, seed * 1000 + number * 100 + index)
    return root


def head_train(*arguments: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["head", "train", *arguments])
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 1:  # a bug: show it
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def numpy_scores(head_folder: Path, embeddings: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
    """The head applied with json, numpy and safetensors only, from its saved files."""
    config = json.loads((head_folder / "config.json").read_text())
    tensors = load_file(head_folder / "head.safetensors")
    logits = embeddings.astype(np.float64) @ tensors["weight"].T + tensors["bias"]  # (N, H)
    if config["multi_label"]:
        scores = 1 / (1 + np.exp(-logits))
    else:
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = exp / exp.sum(axis=1, keepdims=True)
    names, thresholds = config["label_names"], config["thresholds"]
    labels = [
        [n for n, s, t in zip(names, row, thresholds, strict=True) if s >= t] for row in scores
    ]
    return scores, labels


@pytest.fixture(scope="module")
def separable(tmp_path_factory) -> Path:
    return label_folders(
        tmp_path_factory.mktemp("separable"), {s.lower(): s for s in SEPARABLE}, files=8, seed=1
    )


@pytest.fixture(scope="module")
def separable_head(separable, tmp_path_factory):
    folder = tmp_path_factory.mktemp("heads") / "separable"
    return train_head(TrainConfig(str(separable), str(folder)), echo=lambda line: None)


def test_separable_examples_reach_high_held_out_accuracy(separable, tmp_path):
    head = tmp_path / "head"
    code, stdout, stderr = head_train(
        str(separable),
        "--output",
        str(head),
        "--model",
        "default",
        "--plot",
        str(tmp_path / "cv.png"),
    )
    assert code == 0, stderr
    config = json.loads((head / "config.json").read_text())
    validation = config["cross_validation"]
    assert validation["accuracy"] >= 0.95
    assert validation["chance_accuracy"] == pytest.approx(1 / 3, abs=1e-3)
    assert all(figures["average_precision"] >= 0.95 for figures in validation["labels"].values())
    assert config["label_names"] == ["clicking", "sine wave", "white noise"]
    assert config["multi_label"] is False
    assert config["base_model"]["hidden_size"] == 64
    assert len(config["base_model"]["weights_sha256"]) == 64
    assert config["training"]["examples"]["files"] == 24
    assert np.asarray(validation["confusion_matrix"]["counts"]).sum() == 24
    # The table on stdout, the progress on stderr.
    assert re.search(r"^sine wave\s+8\s+8\s", stdout, re.M), stdout
    assert "accuracy (top score's label)" in stdout
    assert "fold 5/5" in stderr and "embeddings: 24 of 24 files" in stderr
    assert (tmp_path / "cv.png").read_bytes()[:4] == b"\x89PNG"
    card = (head / "README.md").read_text()
    assert "| sine wave |" in card and "5-fold cross-validation split by file" in card


def test_pure_noise_reports_chance(tmp_path):
    """Two labels on clips of one and the same kind of noise: nothing to learn, and the report
    says so. Held-out accuracy and average precision at chance, within 0.15: three standard
    deviations of chance over 100 files (20 random labelings of such files: mean accuracy 0.54,
    standard deviation 0.08 at 40 files)."""
    examples = label_folders(
        tmp_path / "noise", {"left": "White noise", "right": "White noise"}, files=50, seed=2
    )
    result = train_head(TrainConfig(str(examples), str(tmp_path / "head")), echo=print)
    report = result.report
    print(result.table)
    assert report.chance_accuracy == pytest.approx(0.5)
    assert abs(report.accuracy - 0.5) <= 0.15, result.table
    for figures in report.labels:
        assert figures.average_precision <= figures.chance_average_precision + 0.15
        assert figures.f1 <= 0.67 + 0.15  # 0.67: the F1 of calling every window this label


def test_saved_head_scores_equal_numpy_and_the_trained_model(separable_head):
    result = separable_head
    folder = Path(result.head.name)
    embeddings = result.examples.embeddings  # (N, D) as an output stores them
    expected = result.model.probabilities(embeddings)  # scikit-learn's own
    scores, labels = numpy_scores(folder, embeddings)
    np.testing.assert_allclose(scores, expected, atol=PROBABILITY_TOLERANCE)
    loaded = load_head(str(folder))
    np.testing.assert_allclose(loaded.scores(embeddings), expected, atol=PROBABILITY_TOLERANCE)
    head_labels = loaded.labels(loaded.scores(embeddings))
    assert [sorted(row) for row in head_labels] == [sorted(row) for row in labels]
    assert loaded.sha256 == result.head.sha256
    # The model card's own snippet, run as written, gives the same scores and labels.
    snippet = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)[1]
    namespace = {"embeddings": embeddings}
    exec(snippet.replace("HEAD/", f"{folder}/"), namespace)
    np.testing.assert_allclose(namespace["scores"], expected, atol=PROBABILITY_TOLERANCE)
    assert [sorted(row) for row in namespace["labels"]] == [sorted(row) for row in labels]


def test_the_same_examples_and_seed_give_the_same_head(separable, separable_head, tmp_path):
    again = train_head(TrainConfig(str(separable), str(tmp_path / "head")), echo=lambda _: None)
    assert again.head.sha256 == separable_head.head.sha256
    assert again.head.details == separable_head.head.details


# --- manifests, tar shards, spans; Ray and outputs ------------------------------------------------


def write_manifest(path: Path, rows: list[dict]) -> Path:
    columns = ["uri", "shard", "key", "label", "start_s", "end_s"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def mixed_examples(tmp_path_factory) -> Path:
    """A manifest over plain WAVs (relative and absolute), members of a tar shard and spans of
    one long file: 8 files of "tone" and 8 of "clicks"."""
    root = tmp_path_factory.mktemp("mixed")
    sounds = {"tone": "Sine wave", "clicks": "Clicking"}
    rows = []
    for number, (label, sound) in enumerate(sounds.items()):
        for index in range(5):
            path = write_clip(
                root / "clips" / f"{label}-{index}.wav", sound, 300 + 10 * number + index
            )
            uri = str(path) if index % 2 else f"clips/{path.name}"  # relative to the manifest
            rows.append({"uri": uri, "label": label})
    members = []
    for number, (label, sound) in enumerate(sounds.items()):
        for index in (5, 6):
            clip = generate_clip(
                sound, np.random.default_rng(400 + 10 * number + index), duration_s=3.0
            )
            members.append((f"{label}/{index}.flac", encode(clip, SAMPLE_RATE, "flac")))
            rows.append(
                {"shard": str(root / "shard-000000.tar"), "key": f"{label}/{index}", "label": label}
            )
    write_tar_shard(root / "shard-000000.tar", members)
    # One 6 s file: tone, then clicks. With 2 s windows, [2, 4) lies in neither span by half.
    rng = np.random.default_rng(500)
    long = np.concatenate(
        [
            generate_clip("Sine wave", rng, duration_s=3.0),
            generate_clip("Clicking", rng, duration_s=3.0),
        ]
    )
    sf.write(root / "long.wav", long, SAMPLE_RATE)
    rows.append({"uri": "long.wav", "label": "tone", "start_s": 0, "end_s": 2.5})
    rows.append({"uri": "long.wav", "label": "clicks", "start_s": 3.5, "end_s": 6})
    return write_manifest(root / "examples.csv", rows)


@pytest.mark.slow
def test_training_from_an_output_equals_training_from_the_same_audio(
    ray_local, mixed_examples, tmp_path
):
    quiet = lambda line: None  # noqa: E731
    common = {"folds": 4}
    options = {"window_s": 2.0}
    in_process = train_head(
        TrainConfig(
            str(mixed_examples), str(tmp_path / "a"), options=LabelingOptions(**options), **common
        ),
        echo=quiet,
    )
    scratch = tmp_path / "scratch"
    on_ray = train_head(
        TrainConfig(
            str(mixed_examples),
            str(tmp_path / "b"),
            options=LabelingOptions(**options),
            ray_above=0,
            scratch=str(scratch),
            **common,
        ),
        echo=quiet,
    )
    code, stdout, stderr = head_train(
        str(mixed_examples),
        "--from-output",
        str(scratch),
        "--output",
        str(tmp_path / "c"),
        "--model",
        "default",
        "--folds",
        "4",
    )
    assert code == 0, stderr
    from_output = load_head(str(tmp_path / "c"))

    examples = in_process.examples
    # 10 plain files, 4 tar members, and the long file with its two spans: 8 files per label.
    assert len(examples.files) == 15 and examples.files_per_label() == {"clicks": 8, "tone": 8}
    assert examples.windows_per_label() == {"clicks": 10, "tone": 10}
    assert examples.windows_outside_spans == 1
    assert in_process.report.accuracy >= 0.95
    # Ray's labeling into the scratch output and the output itself: the same rows, the same head.
    assert on_ray.head.sha256 == from_output.sha256
    assert "run on Ray, into" in on_ray.head.details["training"]["embeddings"]
    # predict's and run's embeddings of the same audio differ in float rounding only.
    np.testing.assert_allclose(
        on_ray.examples.embeddings, examples.embeddings, atol=1e-4, rtol=1e-4
    )
    for head in (on_ray.head, from_output):
        np.testing.assert_allclose(
            head.scores(examples.embeddings),
            in_process.head.scores(examples.embeddings),
            atol=SAME_AUDIO_TOLERANCE,
        )
        np.testing.assert_allclose(
            head.thresholds, in_process.head.thresholds, atol=SAME_AUDIO_TOLERANCE
        )
        assert head.base_model == in_process.head.base_model
        assert (
            head.details["cross_validation"]["confusion_matrix"]
            == (in_process.head.details["cross_validation"]["confusion_matrix"])
        )
    # A two-label softmax head, saved as two rows of weights: numpy from the files agrees.
    scores, _ = numpy_scores(tmp_path / "a", examples.embeddings)
    np.testing.assert_allclose(
        scores, in_process.model.probabilities(examples.embeddings), atol=PROBABILITY_TOLERANCE
    )


def test_several_labels_on_one_file_make_a_multi_label_head(tmp_path):
    """Chords mixed with hiss at the same level, labeled with both; pure chords, pure hiss and
    near-silence beside them: a sigmoid per label, thresholds at a target precision."""
    rows = []
    for index in range(6):
        chord = write_clip(tmp_path / f"chord-{index}.wav", "Harmonic", 600 + index)
        hiss = write_clip(tmp_path / f"hiss-{index}.wav", "White noise", 700 + index)
        quiet = write_clip(tmp_path / f"quiet-{index}.wav", "Silence", 800 + index)
        both = tmp_path / f"both-{index}.wav"
        parts = [sf.read(chord)[0], sf.read(hiss)[0][::-1]]
        sf.write(both, sum(part / np.sqrt(np.mean(part**2)) * 0.05 for part in parts), SAMPLE_RATE)
        rows += [
            {"uri": chord.name, "label": "chord"},
            {"uri": hiss.name, "label": "hiss"},
            {"uri": quiet.name, "label": "quiet"},
            {"uri": both.name, "label": "chord"},
            {"uri": both.name, "label": "hiss"},
        ]
    manifest = write_manifest(tmp_path / "examples.csv", rows)
    result = train_head(
        TrainConfig(str(manifest), str(tmp_path / "head"), target_precision=0.9), echo=print
    )
    print(result.table)
    head = result.head
    assert head.multi_label and head.label_names == ("chord", "hiss", "quiet")
    assert result.report.accuracy is None and result.report.confusion is None
    for figures in result.report.labels:
        assert figures.average_precision >= 0.95
        assert figures.precision >= 0.9 - 0.1  # the target, on thresholds from the other folds
    assert "lowest threshold reaching precision 0.9" in head.details["training"]["thresholds"]
    scores, labels = numpy_scores(tmp_path / "head", result.examples.embeddings)
    np.testing.assert_allclose(
        scores, result.model.probabilities(result.examples.embeddings), atol=PROBABILITY_TOLERANCE
    )
    mixed = [i for i, ref in enumerate(result.examples.files) if "both-" in str(ref.key)]
    in_mixture = np.isin(result.examples.file_of, mixed)  # (N,) the windows of mixtures
    assert all(set(labels[i]) == {"chord", "hiss"} for i in np.flatnonzero(in_mixture))


def test_a_tar_shard_in_a_label_folder_gives_every_member_as_an_example(tmp_path):
    examples = label_folders(tmp_path / "ex", {"hum": "Mains hum"}, files=5, seed=10)
    members = [
        (f"beep-{i}.wav", encode(generate_clip("Beep, bleep", np.random.default_rng(i)), 16_000))
        for i in range(5)
    ]
    write_tar_shard(examples / "alarm" / "shard-000000.tar", members)
    result = train_head(TrainConfig(str(examples), str(tmp_path / "head")), echo=print)
    shard = str(examples / "alarm" / "shard-000000.tar")
    assert sorted(ref.key for ref in result.examples.files if ref.shard == shard) == [
        f"beep-{i}" for i in range(5)
    ]
    assert result.examples.files_per_label() == {"alarm": 5, "hum": 5}
    assert result.report.accuracy >= 0.9


# --- bad input: one line, exit 2, before any work -------------------------------------------------


def error_line(code: int, stderr: str) -> str:
    assert code == 2, stderr
    assert "embeddings:" not in stderr and "fold 1/" not in stderr  # nothing was labeled
    [line] = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    return line


def test_a_single_label_is_refused(tmp_path):
    examples = label_folders(tmp_path / "one", {"alarm": "Beep, bleep"}, files=2, seed=3)
    code, _, stderr = head_train(str(examples), "-o", str(tmp_path / "head"))
    assert "hold 1 label ('alarm'): a head needs at least two" in error_line(code, stderr)


def test_a_label_with_fewer_files_than_folds_is_named_with_its_count(tmp_path):
    examples = label_folders(tmp_path / "ex", {"alarm": "Beep, bleep"}, files=5, seed=4)
    label_folders(examples, {"fault": "Mains hum"}, files=3, seed=5)
    code, _, stderr = head_train(str(examples), "-o", str(tmp_path / "head"))
    line = error_line(code, stderr)
    assert "label 'fault' has 3 example files; 5-fold cross-validation" in line
    assert "--folds 3" in line


def test_a_manifest_naming_a_missing_file_is_refused(tmp_path):
    write_clip(tmp_path / "a.wav", "Sine wave", 6)
    rows = [{"uri": "a.wav", "label": "x"}, {"uri": "gone.wav", "label": "y"}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    code, _, stderr = head_train(str(manifest), "-o", str(tmp_path / "head"))
    line = error_line(code, stderr)
    assert "input not found" in line and str(tmp_path / "gone.wav") in line


def test_a_manifest_naming_a_missing_key_is_refused(tmp_path):
    clip = encode(generate_clip("Sine wave", np.random.default_rng(7), duration_s=1.0), SAMPLE_RATE)
    write_tar_shard(tmp_path / "s.tar", [("a.wav", clip), ("b.wav", clip)])
    rows = [
        {"shard": "s.tar", "key": "a", "label": "x"},
        {"shard": "s.tar", "key": "c", "label": "y"},
    ]
    code, _, stderr = head_train(
        str(write_manifest(tmp_path / "m.csv", rows)), "-o", str(tmp_path / "h")
    )
    assert f"key 'c', which shard {tmp_path / 's.tar'} does not hold" in error_line(code, stderr)


@pytest.fixture()
def foreign_output(tmp_path) -> Path:
    """A real output's layout and schema, as made by a model whose weights hash is 0...0."""
    synthetic_output(str(tmp_path / "out"), rows=60, label_names=("x", "y"), hidden=64, units=2)
    return tmp_path / "out"


def test_an_output_of_another_model_is_refused(foreign_output, tmp_path):
    rows = [{"shard": "s3://corpus/shard-000000.tar", "key": "clip-00000", "label": "x"}]
    manifest = write_manifest(tmp_path / "m.csv", rows + [dict(rows[0], label="y")])
    code, _, stderr = head_train(
        str(manifest),
        "--from-output",
        str(foreign_output),
        "--model",
        "default",
        "-o",
        str(tmp_path / "h"),
    )
    line = error_line(code, stderr)
    assert f"output {foreign_output} was made by model test-model (weights 000000000000)" in line


def test_examples_the_output_does_not_hold_are_refused(foreign_output, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"shard": "s3://corpus/shard-000000.tar", "key": "clip-00000", "label": "x"},
        {"shard": "s3://corpus/shard-000000.tar", "key": "no-such-clip", "label": "y"},
    ]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    code, _, stderr = head_train(
        str(manifest), "--from-output", str(foreign_output), "-o", str(tmp_path / "h")
    )
    line = error_line(code, stderr)
    assert "holds no rows of s3://corpus/shard-000000.tar no-such-clip" in line


def test_unreadable_files_are_reported_and_left_out(tmp_path):
    examples = label_folders(tmp_path / "ex", {"tone": "Sine wave", "hiss": "White noise"}, 5, 8)
    (examples / "tone" / "broken.wav").write_bytes(b"not audio" * 100)
    code, stdout, stderr = head_train(str(examples), "-o", str(tmp_path / "head"))
    assert code == 0, stderr
    broken = examples / "tone" / "broken.wav"
    assert re.search(rf"left out, cannot be read: {re.escape(str(broken))}: cannot decode", stderr)
    training = json.loads((tmp_path / "head" / "config.json").read_text())["training"]
    assert training["examples"]["files"] == 10 and training["examples"]["files_left_out"] == 1
    assert training["examples"]["left_out"][0]["file"] == str(broken)


def test_no_readable_file_left_is_refused(tmp_path):
    for label in ("tone", "hiss"):
        for index in range(5):
            (tmp_path / "ex" / label).mkdir(parents=True, exist_ok=True)
            (tmp_path / "ex" / label / f"{index}.wav").write_bytes(b"not audio" * 100)
    result = CliRunner().invoke(
        main, ["head", "train", str(tmp_path / "ex"), "-o", str(tmp_path / "h")]
    )
    assert result.exit_code == 2, result.output
    assert "Error: no example is left of" in result.stderr
    assert result.stderr.count("cannot be read") == 10


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--plot", "cv.txt"], "--plot cv.txt: give a file name ending in .png"),
        (["--from-output", "out", "--window-s", "2"], "--window-s does not go with --from-output"),
        (["--device", "cpu", "--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_bad_options_are_refused_before_any_work(separable, tmp_path, arguments, message):
    code, _, stderr = head_train(str(separable), "-o", str(tmp_path / "h"), *arguments)
    assert message in error_line(code, stderr)


def test_an_existing_head_is_kept_unless_overwrite(separable, tmp_path):
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "notes.txt").write_text("mine")
    code, _, stderr = head_train(str(separable), "-o", str(tmp_path / "head"))
    assert "already holds files: give a new folder, or --overwrite" in error_line(code, stderr)
    assert (tmp_path / "head" / "notes.txt").read_text() == "mine"

    code, _, stderr = head_train(str(separable), "-o", str(tmp_path / "head"), "--overwrite")
    assert code == 0, stderr
    assert load_head(str(tmp_path / "head")).label_names == ("clicking", "sine wave", "white noise")


def test_a_manifest_without_labels_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("uri,class\na.wav,x\n")
    code, _, stderr = head_train(str(tmp_path / "m.csv"), "-o", str(tmp_path / "h"))
    assert "has columns uri, class: it needs 'label'" in error_line(code, stderr)


def test_a_damaged_shard_is_refused_at_once(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"\x00not a tar" * 100)
    rows = [{"uri": "bad.tar", "label": "x"}, {"shard": "bad.tar", "key": "a", "label": "y"}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    code, _, stderr = head_train(str(manifest), "-o", str(tmp_path / "h"))
    assert f"cannot list the members of shard {tmp_path / 'bad.tar'}" in error_line(code, stderr)
