"""Before a run writes: what the output holds already, and which planned units to skip.

A planned unit is skipped when it is committed (reader.py's rule) with a marker this run can read
and the same model fingerprint. Results of another model or other settings, and units that group
this plan's inputs differently, stop the run with one line instead of mixing results.
`--overwrite` deletes every ast-label file of the output first (and nothing else).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipeline.defaults import META_DIR
from pipeline.output.commit import CommittedUnit
from pipeline.output.index import read_commit_markers
from pipeline.output.layout import COMMITS_DIR, OutputError, OutputLocation
from pipeline.output.reader import committed_unit_files
from pipeline.storage import delete_path, is_temp_name, list_folder, with_retries


@dataclass(frozen=True)
class Resume:
    units: dict[str, CommittedUnit]  # every committed unit of the output, planned or not
    committed: frozenset[str]  # the planned units already committed: the run skips them


def check_resume(
    location: OutputLocation,
    planned_units: Iterable[tuple[str, Sequence[str]]],
    model_fingerprint: str,
    overwrite: bool,
) -> Resume:
    """What the output holds already, and which planned units (unit id, sources) to skip.

    Raises OutputError when the output holds another model's/settings' results, or units that
    group this plan's inputs differently (rows would be duplicated). overwrite=True first deletes
    every ast-label file of the output (unit files and the .ast-label folder; nothing else) and
    returns nothing.
    """
    if overwrite:
        wipe(location)
        return Resume({}, frozenset())
    plan = {unit_id: tuple(sources) for unit_id, sources in planned_units}
    units = read_commit_markers(location)
    for unit_id, unit in sorted(units.items()):
        if unit.model_fingerprint != model_fingerprint:
            raise OutputError(
                f"{location.uri} holds results from another model or settings (unit {unit_id}); "
                "use --overwrite to replace them, or another output"
            )
    for unit_id, unit in sorted(units.items()):
        if unit_id in plan and set(unit.sources) != set(plan[unit_id]):
            _regrouped(location, unit, set(plan[unit_id]))
    others = [unit for unit_id, unit in units.items() if unit_id not in plan]
    if others:  # units of other runs: none of them may hold an input of this plan
        planned_sources = {source for sources in plan.values() for source in sources}
        for unit in sorted(others, key=lambda unit: unit.unit_id):
            if not planned_sources.isdisjoint(unit.sources):
                _regrouped(location, unit, planned_sources)
    files = committed_unit_files(location, markers=units.keys()).files
    committed = frozenset(unit_id for unit_id in plan if unit_id in units and unit_id in files)
    # Staging left by a run killed after a marker but before its cleanup: those units are skipped
    # now, so nothing else would ever remove it.
    fs, staging = location.fs, location.staging()
    for path in with_retries(lambda: list_folder(fs, staging), f"cannot list {staging}"):
        if posixpath.basename(path) in committed:
            delete_path(fs, path)
    # A planned unit with a marker but no unit file is redone: its old fields no longer count.
    for unit_id in plan.keys() - committed:
        units.pop(unit_id, None)
    return Resume(units, committed)


def _regrouped(location: OutputLocation, unit: CommittedUnit, planned_sources: set[str]) -> None:
    # A marker may list no sources (from_marker defaults them to ()): then there is no example.
    example = next((s for s in unit.sources if s in planned_sources), None)
    example = example or next(iter(unit.sources), "")
    shown = f" (e.g. {example})" if example else ""
    raise OutputError(
        f"{location.uri}: committed unit {unit.unit_id} groups the inputs differently from this "
        f"run{shown}, so rows would be duplicated; use --overwrite or another output"
    )


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
