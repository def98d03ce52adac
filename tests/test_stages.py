"""Each stage of a run as a plain function of a batch, without Ray (as Ray's docs advise): the read
stage's rows and fbank, the classifier's numbers, the writer and commit on what they produce."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from audio_corpus import encode, sine, tar_bytes

from ast_model.checkpoint import load_checkpoint
from ast_model.config import FbankConfig
from ast_model.features import compute_fbank, pad_waveforms
from ast_model.labels import scores_from_logits
from pipeline import rows as R
from pipeline.audio import cut_windows, decode_audio
from pipeline.labeling.classify import Classify, ClassifyAndStage
from pipeline.labeling.plan import WorkUnit, tar_unit_id
from pipeline.labeling.read import ReadStage
from pipeline.labeling.transport import fbank_to_numpy, fbank_to_torch
from pipeline.output.commit import StagingLedger, commit_unit
from pipeline.output.layout import OutputLocation
from pipeline.output.schema import OutputSpec
from pipeline.output.staging import RECORD_COLUMNS
from pipeline.settings import ClassifierSettings, FeatureSettings, ReadSettings, feature_dtype

READ = ReadSettings(window_s=10.24, hop_s=10.24, max_duration_s=60.0, max_member_bytes=1 << 22)
CONFIG = FbankConfig()


@pytest.fixture
def shard_unit(tmp_path) -> tuple[WorkUnit, dict[str, bytes]]:
    audio = {
        "a": encode(sine(3.0, sr=44_100, channels=2, freq=300.0), 44_100, "wav"),
        "b": encode(sine(25.0, sr=16_000, freq=900.0), 16_000, "flac"),  # three windows
        "c": encode(sine(1.0, sr=22_050, freq=2_000.0), 22_050, "ogg"),
    }
    entries = [
        (f"{key}.{ext}", data)
        for (key, data), ext in zip(audio.items(), "wav flac ogg".split(), strict=True)
    ]
    entries.insert(1, ("broken.wav", b"RIFF but not really audio" * 10))
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(tar_bytes(entries))
    return WorkUnit(tar_unit_id(str(path)), "tar", (str(path),)), audio


def concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def test_read_stage_emits_window_rows_with_fbank_and_the_units_total_on_its_last_row(shard_unit):
    unit, audio = shard_unit
    batches = list(ReadStage(READ, FeatureSettings(CONFIG, "float32", 4)).batches([unit]))

    assert [len(b[R.KEY]) for b in batches] == [4, 2]  # batch_rows at a time, across files
    batch = concat(batches)
    assert list(batch[R.KEY]) == ["a", "broken", "b", "b", "b", "c"]
    assert list(batch[R.WINDOW_INDEX]) == [0, 0, 0, 1, 2, 0]
    assert list(batch[R.UNIT_ROWS]) == [0, 0, 0, 0, 0, 6]
    assert set(batch[R.UNIT_ID]) == {unit.unit_id} and set(batch[R.SHARD]) == {unit.sources[0]}
    assert batch[R.ERROR][1].startswith("cannot decode .wav") and not any(batch[R.UNIT_FAILURE])
    for name, dtype in R.ROW_DTYPES.items():
        assert batch[name].dtype == dtype, name
    assert batch[R.FBANK].shape == (6, 1024, 128) and batch[R.FBANK].dtype == np.float32
    assert not batch[R.FBANK][1].any()  # the error row's fbank is zeros, never looked at
    # end_s never passes the file's duration, even where resampling rounds up.
    assert all(batch[R.END_S] <= batch[R.DURATION_S] + 1e-12)
    assert batch[R.END_S][4] == pytest.approx(25.0) and batch[R.START_S][4] == pytest.approx(20.48)

    # The fbank is the model's own features of each window of the decoded audio.
    decoded = decode_audio(audio["b"], "flac", 60.0)
    windows = cut_windows(decoded.waveform, 10.24)
    expected = compute_fbank(*pad_waveforms([w.waveform for w in windows]), CONFIG).numpy()
    np.testing.assert_array_equal(batch[R.FBANK][2:5], expected)


def test_a_units_rows_may_share_batches_with_the_next_units(tmp_path):
    units = []
    for index in range(3):
        path = tmp_path / f"s{index}.tar"
        path.write_bytes(tar_bytes([(f"k{index}.wav", encode(sine(1.0), 16_000, "wav"))]))
        units.append(WorkUnit(tar_unit_id(str(path)), "tar", (str(path),)))
    batches = list(ReadStage(READ, FeatureSettings(CONFIG, "float32", 2)).batches(units))
    batch = concat(batches)
    assert [len(b[R.KEY]) for b in batches] == [2, 1]
    assert list(batch[R.UNIT_ROWS]) == [1, 1, 1]  # each one-row unit carries its own total


def test_a_storage_failure_ends_the_unit_with_a_failure_row_not_an_error_row(tmp_path):
    missing = WorkUnit("gone", "tar", (str(tmp_path / "gone.tar"),))
    (batch,) = ReadStage(READ, FeatureSettings(CONFIG, "float32", 4)).batches([missing])
    assert list(batch[R.ERROR]) == [""]
    assert "gone.tar: not found" in batch[R.UNIT_FAILURE][0]
    assert list(batch[R.UNIT_ROWS]) == [1]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_fbank_round_trips_bit_for_bit(dtype):
    fbank = torch.randn(2, 1024, 128)
    narrow = fbank.to(getattr(torch, dtype))
    back = fbank_to_torch(fbank_to_numpy(fbank, dtype))
    assert back.dtype == narrow.dtype and torch.equal(back, narrow)


def test_features_travel_in_the_dtype_the_classifier_computes_in():
    assert feature_dtype("auto", use_gpu=False) == "float32"
    assert feature_dtype("auto", use_gpu=True) == "bfloat16"
    assert feature_dtype("fp16", use_gpu=True) == "float16"
    assert feature_dtype("bf16", use_gpu=False) == "bfloat16"
    assert feature_dtype("fp32", use_gpu=True) == "float32"


def test_classify_gives_the_models_numbers_and_zeros_on_rows_without_audio(
    shard_unit, tiny_hf_checkpoint
):
    unit, _ = shard_unit
    loaded = load_checkpoint(str(tiny_hf_checkpoint))
    batch = concat(list(ReadStage(READ, FeatureSettings(CONFIG)).batches([unit])))
    fbank = batch[R.FBANK].copy()

    out = Classify(loaded, ClassifierSettings("cpu", "fp32", top_k=3))(batch)

    assert R.FBANK not in out
    labeled = R.labeled_rows(out)
    assert list(labeled) == [True, False, True, True, True, True]
    with torch.inference_mode():
        output = loaded.model(torch.from_numpy(fbank[labeled]))
        scores = scores_from_logits(output.logits, loaded.config.multi_label).numpy()
    np.testing.assert_allclose(out[R.SCORES][labeled], scores, atol=1e-6)
    np.testing.assert_allclose(out[R.EMBEDDING][labeled], output.embedding.numpy(), atol=1e-6)
    assert not out[R.SCORES][1].any() and not out[R.EMBEDDING][1].any()
    expected_top = np.argsort(-out[R.SCORES], axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(out[R.TOP_INDEX], expected_top)


def test_bf16_features_give_exactly_what_autocast_gives_on_fp32_features(
    shard_unit, tiny_hf_checkpoint
):
    """Sending fbank as bf16 changes no number: autocast casts the model's input to bf16 first."""
    unit, _ = shard_unit
    loaded = load_checkpoint(str(tiny_hf_checkpoint))
    settings = [FeatureSettings(CONFIG, dtype) for dtype in ("float32", "bfloat16")]
    fp32, bf16 = (concat(list(ReadStage(READ, s).batches([unit]))) for s in settings)
    classify = Classify(loaded, ClassifierSettings("cpu", "bf16", top_k=3))
    np.testing.assert_array_equal(classify(bf16)[R.SCORES], classify(fp32)[R.SCORES])


def test_classifier_stage_and_commit_turn_read_batches_into_one_sorted_file(
    shard_unit, tiny_hf_checkpoint, tmp_path
):
    unit, _ = shard_unit
    loaded = load_checkpoint(str(tiny_hf_checkpoint))
    spec = OutputSpec(
        OutputLocation.of(str(tmp_path / "out")),
        "run1",
        loaded.config.hidden_size,
        loaded.config.num_labels,
        {"label_names": list(loaded.config.id2label)},
    )
    stage = ClassifyAndStage(loaded, ClassifierSettings("cpu", "fp32", 2), spec)  # in each actor
    ledger = StagingLedger()
    completed = []
    for batch in ReadStage(READ, FeatureSettings(CONFIG, "float32", 4)).batches([unit]):
        records = stage(batch)
        assert set(records) == set(RECORD_COLUMNS)
        completed += ledger.add(records)
    (done,) = completed
    marker = commit_unit(spec, done, unit.sources)

    table = pq.read_table(tmp_path / "out" / f"{unit.unit_id}.parquet")
    assert (marker["files"], marker["windows"], marker["errors"]) == (4, 5, 1)
    assert table["key"].to_pylist() == ["a", "b", "b", "b", "broken", "c"]
    assert table["window_index"].to_pylist() == [0, 0, 1, 2, 0, 0]
    broken = table.to_pylist()[4]
    assert broken["error"].startswith("cannot decode") and broken["scores"] is None
    assert all(len(labels) == 2 for labels in table["top_labels"].to_pylist() if labels)


def test_a_unit_that_yields_no_files_fails_without_touching_the_previous_units_count(
    tmp_path, monkeypatch
):
    import pipeline.labeling.read

    path = tmp_path / "s0.tar"
    path.write_bytes(tar_bytes([("k.wav", encode(sine(1.0), 16_000, "wav"))]))
    units = [WorkUnit(tar_unit_id(str(path)), "tar", (str(path),)), WorkUnit("empty", "files", ())]
    read_members = pipeline.labeling.read.read_unit_members
    monkeypatch.setattr(
        pipeline.labeling.read,
        "read_unit_members",
        lambda unit, limit: iter(()) if unit.unit_id == "empty" else read_members(unit, limit),
    )
    batch = concat(list(ReadStage(READ, FeatureSettings(CONFIG, "float32", 4)).batches(units)))
    assert list(batch[R.UNIT_ID]) == [units[0].unit_id, "empty"]
    assert list(batch[R.UNIT_ROWS]) == [1, 1]  # each unit carries its own count
    assert list(batch[R.UNIT_FAILURE]) == ["", "the unit yielded no files"]
