"""`ast-label similar`, `index` and `near-duplicates`: on outputs whose embeddings the tests
choose (written without Ray, tests/search_output.py), and on a real output of generated audio
labeled by the real pipeline with the bundled model (planted duplicate and re-encoded copy)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
from audio_corpus import encode, write_tar_shard
from click.testing import CliRunner
from labels_output import write_unit
from search_output import WINDOW_S, clustered_vectors, search_unit_table, write_search_unit

from ast_model.config import DEFAULT_MODEL
from pipeline.commands.cli import main
from pipeline.output.reader import open_output
from pipeline.search import duplicates, neighbour_index
from pipeline.search.index_manifest import INDEX_DIR, read_manifest
from pipeline.search.neighbour_index import update_index
from pipeline.search.query import QueryRequest
from pipeline.search.scan_progress import ScanProgress
from pipeline.search.similar import find_similar

LABELS = ("Speech", "Dog", "Bark", "Music", "Silence")
DIM = 16


def invoke(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def one_line_error(result, text: str) -> None:
    """Exit 2 and `Error: ...` on one line, naming `text`; never a traceback."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and text in errors[0], result.output
    assert "Traceback" not in result.output


def write_clustered_output(out: str, units: int, files: int, seed: int = 0) -> dict:
    """`units` unit files of `files` files (1-3 windows each) around 12 centres; returns
    {file name: vectors (W, D)} for the tests' own checks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, DIM))
    written = {}
    for unit in range(units):
        shard = f"s3://corpus/shard-{unit:06d}.tar"
        unit_files = [
            (f"clip-{i:03d}", clustered_vectors(int(rng.integers(1, 4)), centres, rng))
            for i in range(files)
        ]
        write_search_unit(out, f"shard-{unit:06d}", shard, unit_files, LABELS, seed=unit)
        written.update({f"shard-{unit:06d}.tar:{key}": v for key, v in unit_files})
    return written


def ranking(output: str, key: str, k: int = 10, exact: bool = False) -> list[tuple[str, float]]:
    result = find_similar(output, QueryRequest(key=key), k=k, exact=exact)
    return [(f"{m.shard.rsplit('/', 1)[-1]}:{m.key}", m.similarity) for m in result.matches]


# --- outputs the tests write -------------------------------------------------------------------


def test_exact_and_indexed_searches_agree_on_a_small_output(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    files = write_clustered_output(out, units=4, files=60)
    queries = list(files)[::23]
    exact = {key: ranking(out, key, exact=True) for key in queries}

    # A small output's index is one exact (Flat) segment: the same files, the same numbers.
    update_index(open_output(out))
    assert [s.kind for s in read_manifest(open_output(out)).segments] == ["flat"]
    for key in queries:
        assert ranking(out, key) == exact[key]

    # IVF-SQ8 (as for big outputs): approximate, so the same files up to a rare miss; the
    # similarities shown are exact either way (read back from the unit files).
    monkeypatch.setattr(neighbour_index, "IVF_MIN_WINDOWS", 100)
    update_index(open_output(out), rebuild=True)
    assert [s.kind for s in read_manifest(open_output(out)).segments] == ["ivf"]
    found = [len(set(ranking(out, key)) & set(exact[key])) / 10 for key in queries]
    assert np.mean(found) >= 0.9, found
    assert all(ranking(out, key)[0] == exact[key][0] for key in queries)


def test_the_best_file_is_its_best_window_and_the_query_file_is_left_out(tmp_path):
    out = str(tmp_path / "out")
    rng = np.random.default_rng(1)
    query = rng.standard_normal((3, DIM)).astype(np.float32)  # the query file's three windows
    near = np.stack([rng.standard_normal(DIM), query[1] + 0.05, rng.standard_normal(DIM)])
    files = [("query", query), ("near", near.astype(np.float32)), ("broken", None)]
    files += [(f"other-{i}", rng.standard_normal((2, DIM)).astype(np.float32)) for i in range(20)]
    write_search_unit(out, "shard-000000", "s3://corpus/shard-000000.tar", files, LABELS)

    result = invoke("similar", out, "--key", "shard-000000.tar:query", "--start-s", "12", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["query"]["window_index"] == 1 and report["query"]["start_s"] == WINDOW_S
    first = report["matches"][0]
    assert first["file"] == "shard-000000.tar:near" and first["similarity"] > 0.99
    assert first["best_window"] == {"window_index": 1, "start_s": WINDOW_S, "end_s": 2 * WINDOW_S}
    assert [w["window_index"] for w in first["windows"]] == [0, 1, 2]
    assert first["matching_spans"] == [{"start_s": WINDOW_S, "end_s": 2 * WINDOW_S}]
    assert "shard-000000.tar:query" not in [m["file"] for m in report["matches"]]
    assert len(report["matches"]) == 20  # every other file with embeddings; not the error row

    result = invoke("similar", out, "--key", "shard-000000.tar:query", "--start-s", "12", "-k", "3")
    assert result.exit_code == 0 and len(result.stdout.strip().splitlines()) == 3 + 3
    assert "shard-000000.tar:near  [0:10.2-0:20.5 (1/3 windows match)]" in result.stdout
    floor = invoke("similar", out, "--key", "s3://corpus/shard-000000.tar:query", "--start-s", "12")
    assert floor.exit_code == 0 and "shard-000000.tar:near" in floor.stdout
    high = invoke("similar", out, "--key", "shard-000000.tar:query", "--min-similarity", "0.999")
    assert high.exit_code == 0 and "no files at or above 0.999" in high.stdout


def test_an_index_older_than_the_output_still_finds_the_newest_units(tmp_path):
    out = str(tmp_path / "out")
    files = write_clustered_output(out, units=3, files=40)
    key = next(iter(files))
    update_index(open_output(out))
    # A later run commits a unit holding the best match of all.
    newest = [("twin", files[key][:1] + 0.01), ("other", files[key][:1] * -1.0)]
    write_search_unit(out, "shard-000009", "s3://corpus/shard-000009.tar", newest, LABELS)

    result = find_similar(out, QueryRequest(key=key), k=5)
    assert (result.matches[0].key, result.matches[0].shard) == (
        "twin",
        "s3://corpus/shard-000009.tar",
    )
    assert result.searched == {
        "index_windows": sum(len(v) for v in files.values()),
        "index_units": 3,
        "exact_windows": 2,
        "exact_units": 1,
    }
    assert ranking(out, key, k=5) == ranking(out, key, k=5, exact=True)


def test_an_index_rerun_adds_only_the_new_units(tmp_path, monkeypatch):
    monkeypatch.setattr(neighbour_index, "IVF_MIN_WINDOWS", 100)
    out = str(tmp_path / "out")
    write_clustered_output(out, units=3, files=40)
    first = update_index(open_output(out))
    assert (first.units_new, first.segments_written) == (3, 1)
    (big,) = first.manifest.segments

    again = invoke("index", out)
    assert again.exit_code == 0 and "the index is up to date" in again.stdout

    write_search_unit(
        out, "shard-000005", "s3://s/shard-000005.tar", [("a", np.ones((2, DIM)))], LABELS
    )
    result = invoke("index", out)
    assert result.exit_code == 0, result.output
    assert "indexed 1 unit (1 new; 2 windows" in result.stdout
    manifest = read_manifest(open_output(out))
    assert manifest.segments[0] == big  # the big segment is kept as it was
    assert [(s.kind, s.units) for s in manifest.segments[1:]] == [("flat", ("shard-000005",))]
    names = sorted(os.listdir(tmp_path / "out" / INDEX_DIR))
    assert len(names) == 1 + 2 * len(manifest.segments)  # manifest + each segment's two files

    # Nothing new: the small segment stays as it is too, files and all.
    again = invoke("index", out)
    assert again.exit_code == 0 and "the index is up to date" in again.stdout
    assert read_manifest(open_output(out)) == manifest
    assert sorted(os.listdir(tmp_path / "out" / INDEX_DIR)) == names


def test_a_killed_index_leaves_nothing_that_similar_trusts(tmp_path):
    out = str(tmp_path / "out")
    files = write_clustered_output(out, units=2, files=30)
    key = next(iter(files))
    exact = ranking(out, key, exact=True)
    folder = tmp_path / "out" / INDEX_DIR
    # Killed while writing its segment, before the manifest: a part file and no manifest.
    folder.mkdir(parents=True)
    (folder / "seg-0123456789ab.faiss").write_bytes(b"half a segm")  # an object store's
    (folder / ".seg-0123456789ab.ids.npy.tmp-0f0f").write_bytes(b"half")  # a local temp file
    assert ranking(out, key) == exact
    update_index(open_output(out))
    left = sorted(path.name for path in folder.iterdir())
    assert left == sorted(
        [
            "manifest.json",
            *(
                f"{s.name}.{x}"
                for s in read_manifest(open_output(out)).segments
                for x in ("faiss", "ids.npy")
            ),
        ]
    )
    assert ranking(out, key) == exact

    # An index of units that a later run with --overwrite replaced: those are searched exactly
    # (nothing shown from their old rows) until `index` runs again, which replaces their segment.
    shutil.rmtree(tmp_path / "out" / ".ast-label" / "commits")
    files = write_clustered_output(out, units=2, files=30, seed=5)
    result = find_similar(out, QueryRequest(key=key), k=10)
    assert result.searched["exact_units"] == 2 and "index_units" not in result.searched
    assert ranking(out, key) == ranking(out, key, exact=True)
    update_index(open_output(out))
    assert find_similar(out, QueryRequest(key=key), k=10).searched["index_units"] == 2


def test_near_duplicates_need_every_aligned_window_to_match(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    rng = np.random.default_rng(3)
    recording = rng.standard_normal((3, DIM)).astype(np.float32)
    same_start = recording.copy()
    same_start[2] = rng.standard_normal(DIM)  # the same first minute, then something else
    files = [
        ("original", recording),
        ("copy", recording + 0.01 * rng.standard_normal((3, DIM)).astype(np.float32)),
        ("same-start", same_start),
        ("first-window-only", recording[:1]),  # another duration: not the same recording
        ("broken", None),
    ]
    files += [(f"other-{i}", rng.standard_normal((2, DIM)).astype(np.float32)) for i in range(30)]
    write_search_unit(out, "shard-000000", "s3://corpus/shard-000000.tar", files, LABELS)
    write_search_unit(
        out, "shard-000001", "s3://corpus/shard-000001.tar", [("again", recording)], LABELS
    )

    expected = [
        ["1", "true", "shard-000000.tar:copy"],
        ["1", "false", "shard-000000.tar:original"],
        ["1", "false", "shard-000001.tar:again"],
    ]
    for exact_under in (duplicates.EXACT_UNDER_FILES, 0):  # exact blocks, then k-means cells
        monkeypatch.setattr(duplicates, "EXACT_UNDER_FILES", exact_under)
        result = invoke("near-duplicates", out, "--csv", "-")
        assert result.exit_code == 0, result.output
        rows = list(csv.reader(io.StringIO(result.stdout)))
        assert rows[0] == [
            "group",
            "keep",
            "file",
            "shard",
            "key",
            "windows",
            "duration_s",
            "similarity",
        ]
        assert [row[:3] for row in rows[1:]] == expected
        assert all(float(row[7]) >= 0.98 for row in rows[1:])

    text = invoke("near-duplicates", out)
    assert "1 groups of near-duplicates" in text.stdout and "2 files to drop" in text.stdout
    loose = json.loads(invoke("near-duplicates", out, "--min-similarity", "0.5", "--json").stdout)
    assert loose["groups"][0]["files"][0]["keep"] is True and loose["duplicates"] >= 2


def test_bad_inputs_give_one_line_and_exit_2(tmp_path):
    out = str(tmp_path / "out")
    write_clustered_output(out, units=1, files=5)
    one_line_error(invoke("similar", out, "--key", "shard-000000.tar:nope"), "no such file")
    one_line_error(invoke("similar", out), "give either --to CLIP or --key")
    one_line_error(
        invoke("similar", out, "--key", "shard-000000.tar:clip-000", "--start-s", "99"),
        "past the query's end",
    )
    one_line_error(invoke("similar", str(tmp_path / "none"), "--key", "a:b"), "no output at")
    one_line_error(invoke("similar", out, "--key", "x", "--plot", tmp_path / "a.gif"), "--plot")
    one_line_error(invoke("near-duplicates", out, "--min-similarity", "0"), "--min-similarity")
    one_line_error(invoke("near-duplicates", out, "--csv", "-", "--json"), "both write to stdout")

    # An output whose files hold no embedding column.
    bare = str(tmp_path / "bare")
    table = search_unit_table("s3://c/shard-000000.tar", [("a", np.ones((1, DIM)))], LABELS)
    write_unit(bare, "shard-000000", table.drop_columns(["embedding"]))
    for command in (["similar", bare, "--key", "a"], ["index", bare], ["near-duplicates", bare]):
        one_line_error(invoke(*command), "has no embedding column")


def test_index_and_similar_on_s3(s3_server, tmp_path):
    out = s3_server.create_bucket("search-out") + "/labels"
    files = write_clustered_output(out, units=2, files=20)
    key = next(iter(files))
    exact = ranking(out, key, exact=True)
    result = invoke("index", out)
    assert result.exit_code == 0, result.output
    assert ranking(out, key) == exact


def test_progress_is_a_line_every_interval_when_piped():
    written: list[str] = []
    now = [0.0]
    progress = ScanProgress(
        "index", 4, written.append, live=False, interval_s=10, clock=lambda: now[0]
    )
    for step in range(4):
        now[0] = step * 6.0
        progress.unit_done(1000)
    progress.finish()
    assert written == [
        "index: units 3/4 | rows 3,000 | 250 rows/s | ETA 0:04\n",
        "index: units 4/4 | rows 4,000 | 222 rows/s\n",
    ]


# --- a real output: generated audio, the real pipeline, the bundled model -----------------------

SR = 16_000


def _seconds(duration_s: float) -> np.ndarray:
    return np.arange(round(duration_s * SR)) / SR


def recordings() -> dict[str, np.ndarray]:
    """Six different sounds: the bundled model's embeddings of any two differ (cosine <= 0.81)."""
    rng = np.random.default_rng(7)
    t5, t12, t25, t7, t15, t9 = (_seconds(d) for d in (5, 12, 25, 7, 15, 9))
    clicks = np.zeros_like(t5)
    clicks[:: SR // 4] = 0.9
    hum = 0.3 * np.sin(2 * np.pi * 50 * t15) + 0.15 * np.sin(2 * np.pi * 150 * t15)
    sounds = {
        "clicks": 0.3 * np.sin(2 * np.pi * 440 * t5) + clicks,
        "bursts": rng.standard_normal(len(t12)) * 0.3 * ((t12 % 2.0) < 0.7),
        "chirp": 0.4 * np.sin(2 * np.pi * (200 * t25 + 56 * t25**2)),
        "harmonic": sum(0.3 / k * np.sin(2 * np.pi * 220 * k * t7) for k in range(1, 6)),
        "hum": hum + 0.05 * rng.standard_normal(len(t15)),
        "beeps": 0.4 * np.sin(2 * np.pi * 1000 * t9) * ((t9 % 1.0) < 0.2),
    }
    return {name: np.clip(x, -1, 1).astype(np.float32) for name, x in sounds.items()}


@pytest.fixture(scope="module")
def labeled(tmp_path_factory, ray_local):
    """A tar shard of four sounds, and a folder of two more with a byte-for-byte copy of one
    (hum-again.flac) and another recording's copy re-encoded as Ogg Vorbis at 0.9 gain
    (chirp-copy.ogg), labeled by `run` with the bundled model."""
    from pipeline.labeling.run import run_labeling
    from pipeline.settings import LabelingOptions, RunConfig

    root = tmp_path_factory.mktemp("search-corpus")
    sounds = recordings()
    flac = {name: encode(x, SR, "flac") for name, x in sounds.items()}
    members = [(f"{name}.flac", flac[name]) for name in ("clicks", "bursts", "chirp", "harmonic")]
    write_tar_shard(root / "shard-000000.tar", members)
    plain = root / "plain"
    plain.mkdir()
    for name in ("hum", "beeps"):
        (plain / f"{name}.flac").write_bytes(flac[name])
    (plain / "hum-again.flac").write_bytes(flac["hum"])
    (plain / "chirp-copy.ogg").write_bytes(encode(0.9 * sounds["chirp"], SR, "ogg"))
    out = root / "labels"
    summary = run_labeling(
        RunConfig(
            inputs=(str(root / "shard-000000.tar"), str(plain)),
            output=str(out),
            options=LabelingOptions(model=DEFAULT_MODEL),
        ),
        echo=lambda line: None,
    )
    assert (summary.files, summary.errors) == (8, 0)
    return root


@pytest.mark.slow
def test_near_duplicates_finds_the_planted_copy_and_the_re_encoded_one(labeled):
    result = invoke("near-duplicates", labeled / "labels", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    groups = [sorted(f["file"].rsplit("/", 1)[-1] for f in g["files"]) for g in report["groups"]]
    assert sorted(groups) == [
        ["chirp-copy.ogg", "shard-000000.tar:chirp"],
        ["hum-again.flac", "hum.flac"],
    ]
    chirp = next(
        g for g in report["groups"] if len(g["files"]) == 2 and "chirp" in g["files"][0]["file"]
    )
    assert all(f["windows"] == 3 for f in chirp["files"])  # 25 s: all three windows aligned
    assert report["duplicates"] == 2 and report["files"] == 8


@pytest.mark.slow
def test_a_query_clip_s_own_file_ranks_first(labeled):
    out = labeled / "labels"
    beeps = labeled / "plain" / "beeps.flac"
    result = invoke("similar", out, "--to", beeps, "--json")
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)["matches"][0]
    assert first["file"] == str(beeps) and first["similarity"] > 0.999

    # Another take of a sound the output holds (other gain, WAV at 44.1 kHz) finds it first.
    take = labeled / "harmonic-take.wav"
    harmonic = recordings()["harmonic"]
    upsampled = np.interp(
        np.arange(len(harmonic) * 441 // 160) * 160 / 441, np.arange(len(harmonic)), harmonic
    )
    take.write_bytes(encode(0.95 * upsampled.astype(np.float32), 44_100, "wav"))
    result = invoke("similar", out, "--to", take, "-k", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[3].split()[2] == "shard-000000.tar:harmonic"


@pytest.mark.slow
def test_a_key_query_finds_the_re_encoded_copy_and_draws_it(labeled, tmp_path):
    out = labeled / "labels"
    plot = tmp_path / "similar.png"
    result = invoke(
        "similar", out, "--key", "shard-000000.tar:chirp", "--start-s", "15", "--plot", plot
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "[window 1, 0:10.2-0:20.5" in lines[0]
    assert str(labeled / "plain" / "chirp-copy.ogg") in lines[3]
    assert "0:10.2-0:20.5" in lines[3]  # where in the copy: the same part
    assert not any("shard-000000.tar:chirp " in line for line in lines[3:])  # the query's own
    assert plot.stat().st_size > 10_000


@pytest.mark.slow
def test_bad_queries_give_one_line_and_exit_2(labeled, tmp_path, tiny_hf_checkpoint):
    out = labeled / "labels"
    beeps = labeled / "plain" / "beeps.flac"
    junk = tmp_path / "junk.wav"
    junk.write_text("not audio")
    one_line_error(invoke("similar", out, "--to", junk), f"cannot embed {junk}")
    one_line_error(invoke("similar", out, "--to", tmp_path / "missing.wav"), "missing.wav")
    one_line_error(invoke("similar", out, "--to", labeled / "plain"), "give one audio file")
    one_line_error(
        invoke("similar", out, "--to", beeps, "--model", tiny_hf_checkpoint), "another model"
    )
    one_line_error(invoke("similar", out, "--to", beeps, "--key", "a"), "either --to CLIP or --key")
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"mean": -3.0, "std": 3.0, "frames": 1, "files": 1}))
    one_line_error(
        invoke("similar", out, "--to", beeps, "--norm-stats", stats), "normalises fbank otherwise"
    )
