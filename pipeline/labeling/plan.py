"""Work units: what the pipeline reads, labels and commits as one output file.

A work unit is one WebDataset .tar shard, or a group of other files, whatever their extension
(one that is not audio becomes an error row). Planning is deterministic (same inputs -> same unit
ids and grouping) so a rerun recognises the units it already committed.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.defaults import FILES_PER_UNIT
from pipeline.labeling.inputs import expand_inputs

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # tarfile's "r|*" reads gzip shards transparently


@dataclass(frozen=True)
class WorkUnit:
    unit_id: str  # deterministic and filename-safe: names the unit's output file and commit marker
    kind: str  # "tar" | "files"
    sources: tuple[str, ...]  # the tar URI, or the plain file URIs (full URIs, sorted)

    @property
    def shard(self) -> str:
        """The `shard` column: a tar shard is named by its URI; a group of plain files by its id."""
        return self.sources[0] if self.kind == "tar" else self.unit_id


@dataclass(frozen=True)
class Plan:
    units: list[WorkUnit]
    # Files that folders and globs listed but that are not inputs, by reason (inputs.InputFiles).
    skipped: dict[str, int] = field(default_factory=dict)


def plan_work_units(
    inputs: Sequence[str],
    manifest: str | None = None,
    files_per_unit: int = FILES_PER_UNIT,
    exclude: Sequence[str] = (),
) -> Plan:
    """Expands inputs (paths, folders, globs, brace ranges, URLs, a manifest) into work units.

    Each .tar shard is one unit; every other file is sorted by URI and grouped `files_per_unit`
    at a time, whatever its extension: a file that is not audio becomes an error row saying so,
    never a silent gap. Tar units come first, in URI order. `exclude` names folders whose files
    are never inputs (the run's own output). Raises InputError for a missing input, a glob or
    folder with nothing in it, or an unreadable manifest.
    """
    if files_per_unit < 1:
        raise ValueError(f"files_per_unit must be >= 1, got {files_per_unit}")
    found = expand_inputs(inputs, manifest, exclude)
    tars = sorted(uri for uri in found.uris if input_kind(uri) == "tar")
    files = sorted(uri for uri in found.uris if input_kind(uri) == "file")

    units = [WorkUnit(tar_unit_id(uri), "tar", (uri,)) for uri in tars]
    for index, start in enumerate(range(0, len(files), files_per_unit)):
        chunk = tuple(files[start : start + files_per_unit])
        units.append(WorkUnit(files_unit_id(index, chunk), "files", chunk))

    # Two units with one id would overwrite each other's output; 8 hex digits of the URI's hash
    # behind the same readable stem make that practically impossible, but never silently.
    ids = Counter(unit.unit_id for unit in units)
    clashes = [unit_id for unit_id, count in ids.items() if count > 1]
    if clashes:
        raise RuntimeError(f"work unit ids clash: {clashes[:3]}")
    return Plan(units, found.skipped)


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
