"""Work units: what the pipeline reads, labels and commits as one output file.

A work unit is one WebDataset .tar shard, or a group of other files, whatever their extension
(one that is not audio becomes an error row). Only the inputs that the output does not hold yet
are planned, so a corpus that grows is labeled again by running the same command: what is new
goes into new units, committed units stay as they are. Planning is deterministic (the same new
inputs give the same unit ids and grouping).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from pipeline.defaults import FILES_PER_UNIT
from pipeline.labeling.inputs import InputFiles, expand_inputs

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # tarfile's "r|*" reads gzip shards transparently


@dataclass(frozen=True)
class WorkUnit:
    unit_id: str  # deterministic and filename-safe: names the unit's output file and commit marker
    kind: str  # "tar" | "files"
    sources: tuple[str, ...]  # the tar URI, or the plain file URIs (full URIs, sorted)
    missing: tuple[str, ...] = ()  # sources a manifest lists that did not exist: error rows

    @property
    def shard(self) -> str:
        """The `shard` column: a tar shard is named by its URI; a group of plain files by its id."""
        return self.sources[0] if self.kind == "tar" else self.unit_id


@dataclass(frozen=True)
class Plan:
    units: list[WorkUnit]  # the units to label: every input the output does not hold yet
    inputs: frozenset[str]  # every input URI (tar shards and files)
    # Files that folders and globs listed but that are not inputs, by reason (inputs.InputFiles).
    skipped: dict[str, int] = field(default_factory=dict)
    already_labeled: int = 0  # inputs that committed units of the output hold already
    input_bytes: int = 0  # the bytes of the units' sources, as listed (0 where unknown)
    tar_inputs: bool = False  # every input is a tar shard (the summary then says "tar shards")

    @property
    def new_inputs(self) -> int:
        return len(self.inputs) - self.already_labeled


def plan_work_units(
    inputs: Sequence[str],
    manifest: str | None = None,
    files_per_unit: int = FILES_PER_UNIT,
    exclude: Sequence[str] = (),
) -> Plan:
    """Expands inputs (paths, folders, globs, brace ranges, URLs, a manifest) into work units
    (inputs.expand_inputs, then group_work_units). `exclude` names folders whose files are never
    inputs (the run's own output). Raises InputError for a missing input, a glob or folder with
    nothing in it, or an unreadable manifest."""
    return group_work_units(expand_inputs(inputs, manifest, exclude), files_per_unit)


def group_work_units(
    found: InputFiles, files_per_unit: int = FILES_PER_UNIT, labeled: Collection[str] = frozenset()
) -> Plan:
    """The work units of the inputs not `labeled` already (the sources of an output's committed
    units). Each .tar shard is one unit; every other file is sorted by URI and grouped
    `files_per_unit` at a time, whatever its extension: a file that is not audio becomes an error
    row saying so, never a silent gap. Tar units come first, in URI order."""
    if files_per_unit < 1:
        raise ValueError(f"files_per_unit must be >= 1, got {files_per_unit}")
    new = found.uris.difference(labeled)
    tars, files = [], []
    for uri in new:
        (tars if input_kind(uri) == "tar" else files).append(uri)
    tars.sort()
    files.sort()
    missing = found.missing

    units = [WorkUnit(tar_unit_id(uri), "tar", (uri,), _missing((uri,), missing)) for uri in tars]
    for index, start in enumerate(range(0, len(files), files_per_unit)):
        chunk = tuple(files[start : start + files_per_unit])
        units.append(
            WorkUnit(files_unit_id(index, chunk), "files", chunk, _missing(chunk, missing))
        )

    # Two units with one id would overwrite each other's output; 8 hex digits of the URI's hash
    # behind the same readable stem make that practically impossible, but never silently.
    ids = Counter(unit.unit_id for unit in units)
    clashes = [unit_id for unit_id, count in ids.items() if count > 1]
    if clashes:
        raise RuntimeError(f"work unit ids clash: {clashes[:3]}")
    inputs = frozenset(found.uris)
    input_bytes = sum(found.sizes.get(uri, 0) for uri in new)
    tar_inputs = bool(inputs) and not files
    tar_inputs = tar_inputs and all(input_kind(uri) == "tar" for uri in inputs - new)
    return Plan(units, inputs, found.skipped, len(inputs) - len(new), input_bytes, tar_inputs)


def _missing(sources: tuple[str, ...], missing: frozenset[str]) -> tuple[str, ...]:
    return tuple(uri for uri in sources if uri in missing) if missing else ()


def input_kind(uri: str) -> str:
    """The input's kind: "tar" (a WebDataset shard) or "file" (one audio file, or a file that
    will be reported as not audio)."""
    return "tar" if uri.lower().endswith(TAR_SUFFIXES) else "file"


def tar_unit_id(uri: str) -> str:
    """A readable stem plus a short hash of the whole URI: equal basenames in different folders
    get different ids, and the same URI always gets the same id."""
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    for suffix in TAR_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    # Leading "_" / "." are stripped: output readers (Spark, Arrow datasets) skip such files.
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-")[:64] or "shard"
    return f"{stem}-{_sha1(uri)[:8]}"


def files_unit_id(index: int, uris: Sequence[str]) -> str:
    return f"files-{index:06d}-{_sha1(chr(10).join(uris))[:10]}"


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()
