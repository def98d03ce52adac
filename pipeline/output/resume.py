"""Before a run writes: what the output holds already, and what refuses to mix.

The output's committed units (reader.py's rule) are kept as they are: their inputs are not
planned again, so a rerun finishes a killed run and a grown corpus gets only its new inputs
labeled. What a killed run left that is not committed goes: unit files without a marker, markers
without a unit file, staged parts. Results of another model or other settings stop the run with
one line that names each setting that differs. `--overwrite` deletes every ast-label file of the
output first (and nothing else). One run at a time writes to an output.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pipeline.defaults import META_DIR
from pipeline.output.commit import CommittedUnit
from pipeline.output.index import read_commit_markers
from pipeline.output.layout import COMMITS_DIR, OutputError, OutputLocation
from pipeline.output.reader import committed_unit_files, unit_file_metadata
from pipeline.output.schema import FINGERPRINT_IGNORES, OutputSpec
from pipeline.storage import delete_path, is_temp_name, list_folder, with_retries

# Settings shown per difference at most (a long list of label names says little more).
_SHOWN_LABELS = 3


@dataclass(frozen=True)
class Resume:
    units: dict[str, CommittedUnit]  # every committed unit of the output

    @cached_property
    def sources(self) -> frozenset[str]:
        """Every input the committed units hold: labeled already."""
        return frozenset(source for unit in self.units.values() for source in unit.sources)


def check_resume(location: OutputLocation, spec: OutputSpec, overwrite: bool) -> Resume:
    """The output's committed units, once what is not committed is cleared away. Raises
    OutputError when they were made with another model or other settings than `spec`'s."""
    if overwrite:
        wipe(location)
        return Resume({})
    units = read_commit_markers(location)
    _check_settings(location, units, spec)
    listing = committed_unit_files(location, markers=units.keys())
    committed = {unit_id: unit for unit_id, unit in units.items() if unit_id in listing.files}
    fs = location.fs
    # Markers first: a marker without its file would count the file's inputs as labeled.
    for unit_id in units.keys() - committed.keys():
        delete_path(fs, location.marker(unit_id))
    for path in listing.uncommitted.values():  # written, killed before its marker
        delete_path(fs, path)
    delete_path(fs, location.staging())
    return Resume(committed)


def _check_settings(
    location: OutputLocation, units: Mapping[str, CommittedUnit], spec: OutputSpec
) -> None:
    fingerprint = spec.model_fingerprint
    others = (unit for _, unit in sorted(units.items()) if unit.model_fingerprint != fingerprint)
    other = next(others, None)
    if other is None:
        return
    try:
        theirs = unit_file_metadata(location, location.unit_file(other.unit_id))
        differences = settings_differences(theirs, spec.file_metadata)
    except Exception:  # the unit file is gone or unreadable: the fingerprints still differ
        differences = []
    named = "; ".join(differences) or f"unit {other.unit_id} has another settings fingerprint"
    raise OutputError(
        f"{location.uri} holds results made with other settings ({named}); rerun with the "
        "same settings, or use --overwrite to replace them, or another output"
    )


def settings_differences(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """`name: X there, Y here` for each setting that decides a row's numbers and differs
    between an output's metadata (theirs) and a run's (ours)."""
    ignored = {*FINGERPRINT_IGNORES, "model_fingerprint"}
    flat_theirs, flat_ours = _flatten(theirs, ignored), _flatten(ours, ignored)
    differences = []
    for name in sorted(flat_theirs.keys() | flat_ours.keys()):
        there, here = flat_theirs.get(name), flat_ours.get(name)
        if there != here:
            differences.append(f"{name}: {_shown(name, there)} there, {_shown(name, here)} here")
    return differences


def _flatten(settings: Mapping[str, Any], ignored: set[str]) -> dict[str, Any]:
    """One level of nesting as dotted names (features.mean); a head is named by its sha256."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if key in ignored:
            continue
        if key == "head":
            flat[key] = (value or {}).get("sha256")
        elif isinstance(value, Mapping):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    # JSON round-trips tuples as lists and keeps floats: compare what a file would hold.
    return json.loads(json.dumps(flat, default=str))


def _shown(name: str, value: Any) -> str:
    if value is None:
        return "none"
    if name == "label_names" and isinstance(value, list):
        first = ", ".join(repr(label) for label in value[:_SHOWN_LABELS])
        return f"{len(value)} labels ({first}{', ...' if len(value) > _SHOWN_LABELS else ''})"
    if isinstance(value, str) and len(value) == 64 and value.isalnum():  # a sha256
        return value[:12]
    return repr(value) if isinstance(value, str) else str(value)


def wipe(location: OutputLocation) -> None:
    """Deletes every ast-label file of the output: unit files, temp files, the .ast-label folder."""
    fs, root = location.fs, location.root
    # Markers first: a wipe killed halfway leaves no marker pointing at a deleted file.
    delete_path(fs, location.path(COMMITS_DIR))
    for path in with_retries(lambda: list_folder(fs, root), f"cannot list {location.uri}"):
        name = posixpath.basename(path)
        if name.endswith(".parquet") or is_temp_name(name):
            delete_path(fs, path)
    delete_path(fs, location.path(META_DIR))
