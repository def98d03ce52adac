"""End to end: real local Ray, real S3 server on 127.0.0.1, a tiny model written by transformers."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from audio_corpus import (
    BAD_CORPUS_MAX_DURATION_S,
    BAD_CORPUS_MAX_MEMBER_BYTES,
    bad_members,
    bad_shard_entries,
    encode,
    sine,
    tar_bytes,
    write_audio_files,
)
from conftest import TINY_LABELS

from ast_model.checkpoint import load_checkpoint
from ast_model.features import FbankConfig, compute_fbank, pad_waveforms
from ast_model.labels import scores_from_logits
from pipeline.audio import cut_windows, decode_audio
from pipeline.errors import UserError
from pipeline.labeling.run import run_labeling
from pipeline.output.schema import output_schema
from pipeline.settings import LabelingOptions, RunConfig

pytestmark = pytest.mark.slow


def _clip(seconds: float, sr: int, channels: int, freq: float, fmt: str, subtype=None) -> bytes:
    return encode(sine(seconds, sr=sr, channels=channels, freq=freq), sr, fmt, subtype)


def good_shard(index: int) -> tuple[bytes, dict[str, bytes]]:
    """A WebDataset shard of mixed formats and rates; returns the tar and each key's audio."""
    audio = {
        f"s{index}/stereo-44k": _clip(3.0, 44_100, 2, 330.0, "wav"),
        f"s{index}/mono-8k-8bit": _clip(1.5, 8_000, 1, 500.0, "wav", "PCM_U8"),
        f"s{index}/flac-96k-24bit": _clip(2.0, 96_000, 1, 1_000.0, "flac", "PCM_24"),
        f"s{index}/long": _clip(25.0, 16_000, 1, 2_000.0, "ogg"),
    }
    entries = []
    for key, data in audio.items():
        extension = {b"RIFF": "wav", b"fLaC": "flac", b"OggS": "ogg"}[data[:4]]
        entries.append((f"{key}.{extension}", data))
        entries.append((f"{key}.json", json.dumps({"key": key}).encode()))
    return tar_bytes(entries), audio


def direct_scores(checkpoint, data: bytes, window_s: float = 10.24) -> np.ndarray:
    """The model applied in this process to one file's windows: (windows, num_labels)."""
    loaded = load_checkpoint(str(checkpoint))
    decoded = decode_audio(data, None, 3600)
    windows = cut_windows(decoded.waveform, window_s)
    batch, lengths = pad_waveforms([window.waveform for window in windows])
    with torch.inference_mode():
        output = loaded.model(compute_fbank(batch, lengths, FbankConfig.for_model(loaded.config)))
        return scores_from_logits(output.logits, loaded.config.multi_label).numpy()


def read_rows(fs, output_uri: str):
    return pads.dataset(
        output_uri.removeprefix("s3://"), format="parquet", filesystem=fs
    ).to_table()


def test_tar_shards_from_s3_to_parquet_on_s3_equal_the_model_applied_directly(
    ray_local, s3_server, tiny_hf_checkpoint
):
    fs = s3_server.filesystem()
    bucket = s3_server.create_bucket("pipeline-in")
    out_bucket = s3_server.create_bucket("pipeline-out")
    all_audio = {}
    for index in range(3):
        shard, audio = good_shard(index)
        fs.pipe(f"{bucket[5:]}/shards/shard-{index:06d}.tar", shard)
        all_audio.update(audio)
    output = f"{out_bucket}/labels"

    summary = run_labeling(
        RunConfig(
            inputs=(f"{bucket}/shards/shard-{{000000..000002}}.tar",),
            output=output,
            options=LabelingOptions(model=str(tiny_hf_checkpoint), batch_size=4),
        ),
        echo=lambda line: None,
    )

    assert (summary.units, summary.files, summary.errors) == (3, 12, 0)
    assert summary.windows == 3 * (3 + 3)  # three short clips, one 25 s clip in three windows
    table = read_rows(s3_server.filesystem(), output)
    assert table.num_rows == summary.windows
    assert table.column_names == output_schema(1, 1).names  # pinned in test_output.py
    rows = table.to_pylist()
    long_rows = sorted((r for r in rows if r["key"] == "s1/long"), key=lambda r: r["window_index"])
    assert [(r["window_index"], r["start_s"], r["end_s"]) for r in long_rows] == [
        (0, 0.0, 10.24),
        (1, 10.24, 20.48),
        (2, 20.48, 25.0),
    ]
    assert {r["sample_rate"] for r in rows if r["key"].endswith("stereo-44k")} == {44_100}
    assert all(json.loads(r["metadata"])["key"] == r["key"] for r in rows)
    for key, data in all_audio.items():
        got = np.array(
            [r["scores"] for r in sorted(rows, key=lambda r: r["window_index"]) if r["key"] == key]
        )
        np.testing.assert_allclose(got, direct_scores(tiny_hf_checkpoint, data), atol=1e-5)
    final = sorted(p for p in fs.ls(output[5:]) if p.endswith(".parquet"))
    assert len(final) == 3
    with fs.open(final[0]) as handle:
        metadata = json.loads(pq.read_schema(handle).metadata[b"ast_label"])
    assert metadata["label_names"] == list(TINY_LABELS)
    assert metadata["weights_sha256"] == load_checkpoint(str(tiny_hf_checkpoint)).weights_sha256
    summary_json = json.loads(fs.cat(f"{output[5:]}/.ast-label/summary.json"))
    assert summary_json["files"] == 12


def test_plain_files_globs_and_manifests_label_each_file_once(
    ray_local, tmp_path, tiny_hf_checkpoint
):
    folder = tmp_path / "audio"
    paths = write_audio_files(
        folder, [f"a/clip-{i}.wav" for i in range(5)] + ["b/x.flac", "b/y.ogg"]
    )
    manifest = tmp_path / "list.txt"
    manifest.write_text("# clips\n" + "\n".join(str(p) for p in paths[:3]) + "\n")

    by_glob = run_labeling(
        RunConfig(
            inputs=(f"{folder}/**/*.*",),
            output=str(tmp_path / "out-glob"),
            files_per_unit=3,
            options=LabelingOptions(model=str(tiny_hf_checkpoint)),
        ),
        echo=lambda line: None,
    )
    by_manifest = run_labeling(
        RunConfig(
            inputs=(),
            manifest=str(manifest),
            output=str(tmp_path / "out-manifest"),
            options=LabelingOptions(model=str(tiny_hf_checkpoint)),
        ),
        echo=lambda line: None,
    )

    assert (by_glob.files, by_glob.units, by_glob.errors) == (7, 3, 0)
    keys = duckdb.sql(f"select key from read_parquet('{tmp_path}/out-glob/*.parquet')").fetchall()
    assert sorted(k for (k,) in keys) == sorted(str(p) for p in paths)
    assert by_manifest.files == 3


def test_bad_inputs_inside_real_shards_each_become_one_error_row(
    ray_local, tmp_path, tiny_hf_checkpoint
):
    bad = bad_members()
    structural, structural_errors = bad_shard_entries()
    good = _clip(1.0, 16_000, 1, 440.0, "wav")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad-000.tar").write_bytes(
        tar_bytes(
            [("ok-first.wav", good)] + [(m.name, m.data) for m in bad] + [("ok-last.wav", good)]
        )
    )
    (tmp_path / "in" / "bad-001.tar").write_bytes(tar_bytes(structural))
    (tmp_path / "in" / "bad-002.tar").write_bytes(
        tar_bytes([("a.wav", good)])[:700]
    )  # truncated tar
    (tmp_path / "in" / "bad-003.tar").write_bytes(b"")  # empty shard

    summary = run_labeling(
        RunConfig(
            inputs=(str(tmp_path / "in"),),
            output=str(tmp_path / "out"),
            options=LabelingOptions(
                model=str(tiny_hf_checkpoint),
                max_duration_s=BAD_CORPUS_MAX_DURATION_S,
                max_member_bytes=BAD_CORPUS_MAX_MEMBER_BYTES,
            ),
        ),
        echo=lambda line: None,
    )

    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    by_key: dict[str, list[dict]] = {}
    for row in rows:
        by_key.setdefault(f"{row['shard'].rsplit('/', 1)[-1]}:{row['key']}", []).append(row)
    for member in bad:
        (row,) = by_key[f"bad-000.tar:{member.key}"]
        assert member.expected_error in row["error"], (member.name, row["error"])
        assert row["embedding"] is None and row["scores"] is None
    for key, expected in structural_errors.items():
        assert any(expected in (r["error"] or "") for r in by_key[f"bad-001.tar:{key}"])
    for key in ("bad-000.tar:ok-first", "bad-000.tar:ok-last", "bad-001.tar:clips/good-a"):
        (row,) = by_key[key]
        assert row["error"] is None and len(row["scores"]) == 5
    assert by_key["bad-002.tar:"][0]["error"]
    assert by_key["bad-003.tar:"][0]["error"]
    assert summary.errors == sum(1 for r in rows if r["error"] is not None)
    assert summary.units == 4


def test_user_errors_fail_fast_with_one_clear_message(tmp_path, tiny_hf_checkpoint):
    with pytest.raises(UserError, match="does-not-exist"):
        run_labeling(
            RunConfig(
                inputs=(str(tmp_path / "does-not-exist"),),
                output=str(tmp_path / "o"),
                options=LabelingOptions(model=str(tiny_hf_checkpoint)),
            ),
            echo=lambda line: None,
        )
    with pytest.raises(UserError, match="--window-s"):
        run_labeling(
            RunConfig(
                inputs=(str(tmp_path),),
                output=str(tmp_path / "o"),
                options=LabelingOptions(model=str(tiny_hf_checkpoint), window_s=20.0),
            ),
            echo=lambda line: None,
        )
