"""Planning work units from inputs, and reading their members, locally and on S3 (moto)."""

from __future__ import annotations

import gzip
import io
import re
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from audio_corpus import (
    BAD_CORPUS_MAX_DURATION_S,
    BAD_CORPUS_MAX_MEMBER_BYTES,
    bad_members,
    bad_shard_entries,
    encode,
    sine,
    tar_bytes,
    write_audio_files,
    write_tar_shard,
)

from pipeline.audio import AudioError, decode_audio
from pipeline.labeling import members
from pipeline.labeling.inputs import InputError, expand_braces
from pipeline.labeling.members import Member, read_unit_members, split_key
from pipeline.labeling.plan import WorkUnit, plan_work_units
from pipeline.storage import S3_CLIENT_ATTEMPTS, StorageError, filesystem_for, is_local, join_uri

LIMIT = BAD_CORPUS_MAX_MEMBER_BYTES
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def clip(fmt: str = "wav", freq: float = 440.0) -> bytes:
    return encode(sine(0.3, freq=freq), 16_000, fmt)


def good_shard_members(prefix: str = "") -> list[tuple[str, bytes]]:
    return [
        (f"{prefix}a.wav", clip("wav")),
        (f"{prefix}a.json", b'{"id": "a"}'),
        (f"{prefix}b.flac", clip("flac")),
        (f"{prefix}b.txt", b"label: b"),
        (f"{prefix}c.ogg", clip("ogg")),
        (f"{prefix}d.json", b'{"id": "d"}'),  # metadata first: order inside a sample is free
        (f"{prefix}d.MP3", clip("mp3")),
    ]


def write_shards(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        write_tar_shard(folder / name, good_shard_members())
        paths.append(folder / name)
    return paths


def read_all(uri: str, limit: int = LIMIT) -> list[Member]:
    return list(read_unit_members(WorkUnit("u", "tar", (uri,)), limit))


# ---------------------------------------------------------------------------------------------
# Storage


def test_local_paths_and_file_urls_resolve_to_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = filesystem_for("data/x.tar")
    assert path == str(tmp_path / "data/x.tar")
    assert filesystem_for(f"file://{tmp_path}/y.tar") == (fs, str(tmp_path / "y.tar"))
    assert is_local("data/x.tar") and is_local("file:///x") and not is_local("s3://b/k")
    assert join_uri("s3://b/out/", "/_commits", "u.json") == "s3://b/out/_commits/u.json"


# ---------------------------------------------------------------------------------------------
# Planning, local


def test_folder_is_listed_recursively_with_shards_and_audio_files(tmp_path):
    write_shards(tmp_path / "data", ["shard-000000.tar", "deep/shard-000001.tar"])
    write_audio_files(tmp_path / "data", ["x/one.wav", "x/two.FLAC", "three.mp3", "four.ogg"])
    (tmp_path / "data" / "notes.txt").write_text("not an input")
    write_audio_files(tmp_path / "data", [".hidden/five.wav", "._six.wav"])

    plan = plan_work_units([str(tmp_path / "data")], files_per_unit=3)
    units = plan.units

    assert [u.kind for u in units] == ["tar", "tar", "files", "files"]
    assert units[0].sources == (str(tmp_path / "data/deep/shard-000001.tar"),)
    assert units[1].sources == (str(tmp_path / "data/shard-000000.tar"),)
    files = [s for u in units[2:] for s in u.sources]
    # Every file listed is an input, audio or not (notes.txt becomes an error row saying so);
    # hidden ones are skipped, and counted.
    names = ["x/one.wav", "x/two.FLAC", "three.mp3", "four.ogg", "notes.txt"]
    assert files == sorted(str(tmp_path / "data" / n) for n in names)
    assert [len(u.sources) for u in units[2:]] == [3, 2]
    assert plan.skipped == {"hidden files and folders": 2}
    assert re.fullmatch(r"shard-000001-[0-9a-f]{8}", units[0].unit_id)
    assert re.fullmatch(r"files-000000-[0-9a-f]{10}", units[2].unit_id)
    assert re.fullmatch(r"files-000001-[0-9a-f]{10}", units[3].unit_id)


def test_planning_is_deterministic_whatever_the_input_order(tmp_path):
    write_shards(tmp_path, ["s1.tar", "s2.tar"])
    audio = write_audio_files(tmp_path / "clips", [f"c{i}.wav" for i in range(5)])
    inputs = [str(tmp_path / "s2.tar"), str(tmp_path / "clips"), str(tmp_path / "s1.tar")]

    first = plan_work_units(inputs, files_per_unit=2).units
    again = plan_work_units(list(reversed(inputs)), files_per_unit=2).units

    assert first == again
    assert [u.sources for u in first if u.kind == "files"] == [
        tuple(str(p) for p in audio[0:2]),
        tuple(str(p) for p in audio[2:4]),
        (str(audio[4]),),
    ]


def test_same_file_named_twice_is_counted_once(tmp_path):
    (shard,) = write_shards(tmp_path, ["only.tar"])
    (wav,) = write_audio_files(tmp_path, ["x.wav"])
    relative_twin = str(tmp_path / "sub" / ".." / "only.tar")
    units = plan_work_units([str(shard), str(tmp_path), relative_twin, f"{tmp_path}/*.wav"]).units
    assert [u.sources for u in units] == [(str(shard),), (str(wav),)]


def test_equal_shard_names_in_different_folders_get_different_ids(tmp_path):
    write_shards(tmp_path, ["a/shard-000000.tar", "b/shard-000000.tar", "c/we ird (1).tar.gz"])
    ids = [u.unit_id for u in plan_work_units([str(tmp_path)]).units]
    assert len(set(ids)) == 3
    assert all(SAFE_ID.match(unit_id) for unit_id in ids), ids
    assert sorted(i.rsplit("-", 1)[0] for i in ids) == ["shard-000000", "shard-000000", "we_ird_1"]


def test_globs_match_files_and_recurse_with_double_star(tmp_path):
    names = ["shard-1.tar", "shard-2.tar", "other.tar", "sub/shard-3.tar", ".cache/shard-4.tar"]
    write_shards(tmp_path, names)

    def planned(pattern: str) -> list[str]:
        return sorted(
            Path(u.sources[0]).name for u in plan_work_units([f"{tmp_path}/{pattern}"]).units
        )

    assert planned("shard-*.tar") == ["shard-1.tar", "shard-2.tar"]
    assert planned("shard-?.tar") == ["shard-1.tar", "shard-2.tar"]
    # Hidden folders are not inputs, unless the pattern names them outright.
    assert planned("**/shard-*.tar") == ["shard-1.tar", "shard-2.tar", "shard-3.tar"]
    assert planned(".cache/*.tar") == ["shard-4.tar"]


def test_brace_ranges_keep_zero_padding_and_lists_expand(tmp_path):
    write_shards(tmp_path, [f"shard-{i:06d}.tar" for i in range(12)])
    units = plan_work_units([f"{tmp_path}/shard-{{000003..000010}}.tar"]).units
    assert [Path(u.sources[0]).name for u in units] == [f"shard-{i:06d}.tar" for i in range(3, 11)]
    listed = plan_work_units([f"{tmp_path}/shard-00000{{0,2}}.tar"]).units
    assert [Path(u.sources[0]).name for u in listed] == ["shard-000000.tar", "shard-000002.tar"]


def test_brace_expansion_rules():
    assert expand_braces("s-{8..11}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("s-{08..11}") == ["s-08", "s-09", "s-10", "s-11"]
    assert expand_braces("s-{0..100..50}") == ["s-0", "s-50", "s-100"]
    assert expand_braces("s-{3..1}") == ["s-3", "s-2", "s-1"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("{a,b{1..2}}") == ["a", "b1", "b2"]
    assert expand_braces("odd{x}name") == ["odd{x}name"]
    with pytest.raises(InputError, match="more than"):
        expand_braces("s-{0..999999999999}")


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda d: str(d / "nope.tar"), "input not found: {d}/nope.tar"),
        (lambda d: f"{d}/shard-{{000..002}}.tar", "input not found: {d}/shard-002.tar"),
        (lambda d: f"{d}/*.flac", "no files to label match {d}/*.flac"),
        (lambda d: str(d / "empty"), "no files to label under {d}/empty"),
        (lambda d: f"{d}/**.tar", "invalid glob"),
    ],
)
def test_bad_inputs_fail_with_one_line_naming_them(tmp_path, make_input, message):
    write_shards(tmp_path, ["shard-000.tar", "shard-001.tar"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(InputError) as caught:
        plan_work_units([make_input(tmp_path)])
    text = str(caught.value)
    assert message.format(d=tmp_path) in text
    assert "\n" not in text


def test_no_inputs_at_all_is_an_input_error():
    with pytest.raises(InputError, match="no inputs given"):
        plan_work_units([])


# ---------------------------------------------------------------------------------------------
# Manifests


def test_text_manifest_skips_comments_and_resolves_relative_entries(tmp_path):
    write_shards(tmp_path / "shards", ["s0.tar", "s1.tar", "s2.tar"])
    manifest = tmp_path / "list.txt"
    manifest.write_text(
        f"# shards to label\n\nshards/s0.tar\n  shards/s{{1..2}}.tar  \n{tmp_path}/shards/s0.tar\n"
    )
    units = plan_work_units([], manifest=str(manifest)).units
    assert [Path(u.sources[0]).name for u in units] == ["s0.tar", "s1.tar", "s2.tar"]


def test_csv_manifest_uses_the_uri_column_or_the_only_column(tmp_path):
    paths = [str(p) for p in write_shards(tmp_path, ["a.tar", "b.tar"])]
    with_header = tmp_path / "m1.csv"
    with_header.write_text(f"id,uri\n1,{paths[0]}\n2,{paths[1]}\n")
    single_no_header = tmp_path / "m2.csv"
    single_no_header.write_text(f"{paths[0]}\n{paths[1]}\n")
    single_named = tmp_path / "m3.csv"
    single_named.write_text(f"path\n{paths[0]}\n{paths[1]}\n")
    for manifest in (with_header, single_no_header, single_named):
        units = plan_work_units([], manifest=str(manifest)).units
        assert [u.sources[0] for u in units] == paths, manifest.name


def test_parquet_manifest_uses_the_uri_column(tmp_path):
    paths = [str(p) for p in write_shards(tmp_path, ["a.tar", "b.tar"])]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"n": [1, 2], "uri": paths}), manifest)
    assert [u.sources[0] for u in plan_work_units([], manifest=str(manifest)).units] == paths


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "manifest not found"),
        ("empty.txt", "# nothing here\n\n", "lists no URIs"),
        ("cols.csv", "a,b\nx,y\n", "name the column of input URIs 'uri'"),
        ("ints.parquet", pa.table({"uri": [1, 2]}), "not strings"),
        ("broken.parquet", b"PAR1 not really", "cannot read manifest"),
        ("binary.txt", b"\xff\xfe\xfa", "not UTF-8"),
        ("lists-nothing.txt", "nothing-*.tar\n", "listed in manifest"),
    ],
)
def test_bad_manifests_fail_with_one_clear_line(tmp_path, name, content, message):
    manifest = tmp_path / name
    if isinstance(content, pa.Table):
        pq.write_table(content, manifest)
    elif isinstance(content, bytes):
        manifest.write_bytes(content)
    elif content is not None:
        manifest.write_text(content)
    with pytest.raises(InputError) as caught:
        plan_work_units([], manifest=str(manifest))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_manifest_entry_naming_no_file_is_an_input_whose_row_says_so(tmp_path):
    (present,) = write_shards(tmp_path, ["here.tar"])
    wav = tmp_path / "clip.wav"
    wav.write_bytes(encode(sine(1.0), 16_000, "wav"))
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{present}\ngone.tar\n{wav}\nmissing.wav\n")
    with pytest.raises(InputError, match="input not found"):  # on the command line: a typo
        plan_work_units([str(tmp_path / "gone.tar")])

    plan = plan_work_units([], manifest=str(manifest))

    assert len(plan.inputs) == 4
    gone = next(u for u in plan.units if u.sources == (str(tmp_path / "gone.tar"),))
    assert gone.missing == gone.sources
    [member] = list(read_unit_members(gone, LIMIT))
    assert member.error.startswith("not found: the manifest lists it")
    files = next(u for u in plan.units if u.kind == "files")
    assert files.missing == (str(tmp_path / "missing.wav"),)
    by_key = {m.key: m for m in read_unit_members(files, LIMIT)}
    assert by_key[str(wav)].error is None and by_key[str(wav)].audio
    assert by_key[str(tmp_path / "missing.wav")].error.startswith("not found")


# ---------------------------------------------------------------------------------------------
# Reading tar shards


def test_tar_members_group_into_webdataset_samples(tmp_path):
    members = good_shard_members("clips/")
    write_tar_shard(tmp_path / "s.tar", members)
    read = read_all(str(tmp_path / "s.tar"))
    assert [(m.key, m.audio_format, m.metadata, m.error) for m in read] == [
        ("clips/a", "wav", '{"id": "a"}', None),
        ("clips/b", "flac", None, None),
        ("clips/c", "ogg", None, None),
        ("clips/d", "mp3", '{"id": "d"}', None),
    ]
    by_name = dict(members)
    assert read[0].audio == by_name["clips/a.wav"]
    assert read[3].audio == by_name["clips/d.MP3"]


def test_webdataset_key_rule():
    assert split_key("a/b/c.seg1.wav") == ("a/b/c", "seg1.wav")
    assert split_key("noext") == ("noext", "")
    assert split_key("d/.hidden.wav") == ("d/.hidden", "wav")


def test_gzipped_shard_streams_too(tmp_path):
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(tar_bytes(good_shard_members())))
    assert [m.key for m in read_all(str(tmp_path / "s.tar.gz")) if m.error is None] == list("abcd")


def test_bad_corpus_gives_exactly_one_error_row_per_sample(tmp_path):
    """Every bad member, read and decoded as the pipeline does, ends as one reasoned error."""
    corpus = bad_members()
    structural, expected = bad_shard_entries()
    expected.update({bad.key: bad.expected_error for bad in corpus})
    good = [("good-1.wav", clip()), ("good-1.json", b"{}")]
    write_tar_shard(tmp_path / "bad.tar", good + [(b.name, b.data) for b in corpus] + structural)

    outcomes: dict[str, list[str | None]] = {}
    for member in read_all(str(tmp_path / "bad.tar")):
        error = member.error
        if error is None:
            try:
                decode_audio(member.audio, member.audio_format, BAD_CORPUS_MAX_DURATION_S)
            except AudioError as exc:
                error = str(exc)
        outcomes.setdefault(member.key, []).append(error)

    assert outcomes.pop("good-1") == [None]
    assert outcomes.pop("clips/good-a") == [None]
    assert outcomes.pop("clips/good-b") == [None]
    first, second = outcomes.pop("clips/split")  # the first sample is fine, its late file is not
    assert first is None and expected.pop("clips/split") in second
    assert set(outcomes) == set(expected)
    for key, errors in outcomes.items():
        assert len(errors) == 1, key
        assert errors[0] is not None and expected[key] in errors[0], (key, errors)


def test_duplicate_key_keeps_first_sample_and_flags_the_second(tmp_path):
    entries, _ = bad_shard_entries()
    write_tar_shard(tmp_path / "s.tar", entries)
    split = [m for m in read_all(str(tmp_path / "s.tar")) if m.key == "clips/split"]
    assert [m.error is None for m in split] == [True, False]
    assert "duplicate key" in split[1].error
    assert split[1].metadata == '{"late": true}'


def test_oversized_member_is_refused_without_reading_it(tmp_path):
    write_tar_shard(tmp_path / "s.tar", [("big.wav", bytes(50_000)), ("ok.wav", clip())])
    big, ok = read_all(str(tmp_path / "s.tar"), limit=20_000)
    assert big.key == "big" and big.audio is None
    assert "big.wav is 50000 bytes, over the limit of 20000 bytes" in big.error
    assert ok.error is None


def _member_offsets(data: bytes) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of each member of an uncompressed tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar.getmembers()]


@pytest.mark.parametrize("cut", ["inside-data", "inside-header", "at-header", "corrupt-header"])
def test_truncated_or_corrupt_stream_keeps_what_was_read_then_one_error(tmp_path, cut):
    # USTAR: one 512-byte header per member, so offsets are easy to aim at.
    members = [(f"k{i}.wav", clip(freq=300.0 + i)) for i in range(3)]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    _, header_2, data_2 = _member_offsets(data)[2]
    if cut == "inside-data":
        broken = data[: data_2 + 100]
    elif cut == "inside-header":
        broken = data[: header_2 + 100]
    elif cut == "at-header":  # a whole number of blocks: only the missing end marker tells
        broken = data[:header_2]
    else:
        broken = data[:header_2] + b"\x01" * 512 + data[header_2 + 512 :]
    (tmp_path / "s.tar").write_bytes(broken)

    read = read_all(str(tmp_path / "s.tar"))

    assert [(m.key, m.error) for m in read[:2]] == [("k0", None), ("k1", None)]
    assert read[0].audio == members[0][1] and read[1].audio == members[1][1]
    if cut == "inside-data":  # the sample being read when the stream broke is flagged too
        assert read[2].key == "k2" and "k2.wav is cut short" in read[2].error
    *_, last = read
    assert len(read) == (4 if cut == "inside-data" else 3)
    assert last.key == ""
    assert last.error.startswith(f"shard unreadable after {len(read) - 1} members:"), last.error


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "shard unreadable"),
        (b"definitely not a tar archive" * 40, "shard unreadable"),
        (tar_bytes([]), "shard has no audio members"),
    ],
)
def test_unreadable_or_empty_shard_yields_one_error_member(tmp_path, content, message):
    path = tmp_path / "s.tar"
    if content is not None:
        path.write_bytes(content)
    (member,) = read_all(str(path))
    assert member.key == "" and member.audio is None
    assert message in member.error


def test_a_shard_that_vanished_after_planning_is_a_storage_error_not_an_error_row(tmp_path):
    """Missing now is not the shard's fault: the unit must not commit, and a rerun reads it."""
    with pytest.raises(StorageError, match=r"cannot open .*s\.tar: not found"):
        read_all(str(tmp_path / "s.tar"))


# ---------------------------------------------------------------------------------------------
# Reading plain files


def test_files_unit_yields_one_member_per_file_in_order(tmp_path):
    names = [f"c{i:02d}.{ext}" for i, ext in enumerate(["wav", "flac", "ogg", "mp3"] * 3)]
    write_audio_files(tmp_path, names)
    (tmp_path / "big.wav").write_bytes(bytes(LIMIT + 1))
    (unit,) = plan_work_units([str(tmp_path)], files_per_unit=100).units

    members = list(read_unit_members(unit, LIMIT))

    assert [m.key for m in members] == list(unit.sources)
    errors = {Path(m.key).name: m.error for m in members if m.error}
    assert errors == {
        "big.wav": f"file is {LIMIT + 1} bytes, over the limit of {LIMIT} bytes (max_member_bytes)"
    }
    for member in members:
        if member.error is None:
            assert member.audio == Path(member.key).read_bytes()
            assert member.audio_format == member.key.rsplit(".", 1)[1]


def test_a_file_that_vanished_after_planning_ends_its_unit_with_a_storage_error(tmp_path):
    paths = write_audio_files(tmp_path, [f"c{i}.wav" for i in range(4)])
    (unit,) = plan_work_units([str(tmp_path)]).units
    paths[2].unlink()
    members = read_unit_members(unit, LIMIT)
    assert [next(members).key for _ in range(2)] == [str(p) for p in paths[:2]]
    with pytest.raises(StorageError, match=r"cannot read .*c2\.wav: not found"):
        next(members)


# ---------------------------------------------------------------------------------------------
# S3 (moto's server on 127.0.0.1)


@pytest.fixture
def s3_prefix(s3_server) -> str:
    """A fresh prefix per test, so tests never see each other's objects."""
    bucket = s3_server.create_bucket("sources-test")
    return f"{bucket}/{uuid.uuid4().hex[:8]}"


def test_s3_filesystem_uses_the_endpoint_and_bounded_standard_retries(s3_server, s3_prefix):
    fs, path = filesystem_for(f"{s3_prefix}/x.bin")
    assert path == f"{s3_prefix.removeprefix('s3://')}/x.bin"
    assert fs is filesystem_for(f"{s3_prefix}/y.bin")[0]  # one client per process
    retries = fs.config_kwargs["retries"]
    assert retries["mode"] == "standard"
    assert retries["total_max_attempts"] == S3_CLIENT_ATTEMPTS
    fs.pipe(path, b"hello")
    assert s3_server.filesystem().cat(path) == b"hello"


def test_s3_folder_glob_brace_range_and_manifest(s3_server, s3_prefix):
    s3 = s3_server.filesystem()
    shard = tar_bytes(good_shard_members())
    root = s3_prefix.removeprefix("s3://")
    for i in range(70):  # >= 64 names in one folder: planned from one listing
        s3.pipe(f"{root}/shards/shard-{i:06d}.tar", shard)
    s3.pipe(f"{root}/shards/sub/extra.tar", shard)
    s3.pipe(f"{root}/clips/a.wav", clip())
    s3.pipe(f"{root}/clips/readme.txt", b"an input too: its error row will say it is not audio")
    s3.pipe(f"{root}/lists/m.txt", b"../shards/shard-000001.tar\n../clips/a.wav\n")

    folder = plan_work_units([f"{s3_prefix}/shards/"]).units
    assert len(folder) == 71
    assert folder[0].sources == (f"{s3_prefix}/shards/shard-000000.tar",)

    ranged = plan_work_units([f"{s3_prefix}/shards/shard-{{000000..000069}}.tar"]).units
    expected = [f"{s3_prefix}/shards/shard-{i:06d}.tar" for i in range(70)]
    assert [u.sources[0] for u in ranged] == expected
    assert [u.unit_id for u in ranged] == [u.unit_id for u in folder[:70]]

    globbed = plan_work_units(
        [f"{s3_prefix}/shards/shard-00000?.tar", f"{s3_prefix}/clips/*"]
    ).units
    assert len(globbed) == 11
    assert globbed[-1].sources == (f"{s3_prefix}/clips/a.wav", f"{s3_prefix}/clips/readme.txt")

    listed = plan_work_units([], manifest=f"{s3_prefix}/lists/m.txt").units
    assert [u.sources for u in listed] == [
        (f"{s3_prefix}/shards/shard-000001.tar",),
        (f"{s3_prefix}/clips/a.wav",),
    ]

    with pytest.raises(InputError, match=r"input not found: .*shard-000070\.tar"):
        plan_work_units([f"{s3_prefix}/shards/shard-{{000068..000070}}.tar"])
    with pytest.raises(InputError, match=r"no files to label match"):
        plan_work_units([f"{s3_prefix}/nothing/*.tar"])


def test_s3_shard_and_files_stream_like_local_ones(s3_server, s3_prefix):
    s3 = s3_server.filesystem()
    root = s3_prefix.removeprefix("s3://")
    members = good_shard_members()
    s3.pipe(f"{root}/s.tar", tar_bytes(members))
    s3.pipe(f"{root}/truncated.tar", tar_bytes(members)[:3000])
    s3.pipe(f"{root}/c/one.wav", clip())
    s3.pipe(f"{root}/c/two.flac", clip("flac"))

    read = read_all(f"{s3_prefix}/s.tar")
    assert [(m.key, m.error) for m in read] == [(k, None) for k in "abcd"]
    assert read[0].audio == members[0][1]

    truncated = read_all(f"{s3_prefix}/truncated.tar")
    assert truncated[-1].key == "" and "shard unreadable after" in truncated[-1].error

    with pytest.raises(StorageError, match="cannot open .*missing.tar: not found"):
        read_all(f"{s3_prefix}/missing.tar")

    (unit,) = plan_work_units([f"{s3_prefix}/c"]).units
    files = list(read_unit_members(unit, LIMIT))
    assert [(m.key, m.audio_format, m.error) for m in files] == [
        (f"{s3_prefix}/c/one.wav", "wav", None),
        (f"{s3_prefix}/c/two.flac", "flac", None),
    ]
    assert files[1].audio == s3.cat(f"{root}/c/two.flac")


def test_a_planned_file_that_is_not_audio_becomes_an_error_naming_its_extension(tmp_path):
    write_audio_files(tmp_path, ["one.wav"])
    (tmp_path / "notes.TXT").write_text("Just some notes, not a recording.\n" * 20)
    (tmp_path / "README").write_text("No extension at all.\n" * 20)
    (unit,) = plan_work_units([str(tmp_path)]).units

    errors: dict[str, str | None] = {}
    for member in read_unit_members(unit, LIMIT):  # read and decoded as the pipeline does
        errors[Path(member.key).name] = member.error
        try:
            decode_audio(member.audio, member.audio_format, 60.0)
        except AudioError as exc:
            errors[Path(member.key).name] = str(exc)

    not_audio = "not an audio file, or a format neither libsndfile nor FFmpeg decodes"
    assert errors == {
        "README": f"{not_audio} (no extension)",
        "notes.TXT": f"{not_audio} (.txt)",
        "one.wav": None,
    }


def test_a_storage_error_ends_a_files_unit_without_waiting_for_reads_in_flight(monkeypatch):
    released = threading.Event()

    def fake_read_file(uri: str, max_member_bytes: int) -> Member:
        if uri == "first":
            raise StorageError("cannot read first: boom")
        released.wait(10)  # a read stuck retrying in an outage
        return Member(key=uri, audio=b"", audio_format="wav")

    monkeypatch.setattr(members, "_read_file", fake_read_file)
    started = time.monotonic()
    try:
        with pytest.raises(StorageError, match="boom"):
            list(read_unit_members(WorkUnit("u", "files", ("first", "second", "third")), LIMIT))
        assert time.monotonic() - started < 5
    finally:
        released.set()
