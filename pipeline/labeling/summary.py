"""What a labeling run did: the counts of its output's committed units, and the lines that say so.

The summary names inputs (tar shards, or files) as the user gave them: how many were labeled
already, how many are new, how many the output holds that are gone from the input (their rows
stay). Its first line is the run's one rate: files labeled now per second of the whole command.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from pipeline.output.commit import CommittedUnit

# Reasons of units that did not commit shown in the summary (all are in summary.json).
MAX_FAILURES_SHOWN = 10
MAX_ERROR_REASONS_SHOWN = 5


@dataclass
class RunSummary:
    output: str
    units: int = 0  # committed units of the output, those of inputs gone since included
    units_labeled: int = 0  # ... committed by this run
    files: int = 0  # input files the output holds (tar members, or plain files), labeled or not
    windows: int = 0
    errors: int = 0  # error rows
    audio_hours: float = 0.0
    files_now: int = 0  # files labeled by this run
    audio_hours_now: float = 0.0
    wall_s: float = 0.0
    files_per_s: float = 0.0  # files_now / wall_s: the run's one rate
    inputs: int = 0  # inputs given (tar shards and files)
    tar_inputs: bool = False  # whether the inputs are tar shards (else plain files)
    already_labeled: int = 0  # inputs the output held before this run
    new_inputs: int = 0
    gone: int = 0  # inputs the output holds that the input no longer lists (rows kept)
    error_reasons: dict[str, int] = field(default_factory=dict)
    # unit id -> why it did not commit (storage faults): a rerun of the same command labels them
    units_failed: dict[str, str] = field(default_factory=dict)
    # input files that folders and globs listed but that are not inputs, by reason
    inputs_skipped: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.units_failed

    def to_dict(self) -> dict:
        return asdict(self)


def summarise(
    output: str,
    units: Sequence[str],
    labeled_now: Collection[str],
    committed: Mapping[str, CommittedUnit],
    wall_s: float,
) -> RunSummary:
    """The counts of the `units` (ids) that are committed; those `labeled_now` give the rate."""
    summary = RunSummary(output=output, wall_s=round(wall_s, 3))
    for unit_id in units:
        unit = committed.get(unit_id)
        if unit is None:
            continue
        summary.units += 1
        summary.files += unit.files
        summary.windows += unit.windows
        summary.errors += unit.errors
        summary.audio_hours += unit.audio_seconds / 3600.0
        for reason, count in unit.error_reasons.items():
            summary.error_reasons[reason] = summary.error_reasons.get(reason, 0) + count
        if unit_id in labeled_now:
            summary.units_labeled += 1
            summary.files_now += unit.files
            summary.audio_hours_now += unit.audio_seconds / 3600.0
    if wall_s > 0:
        summary.files_per_s = round(summary.files_now / wall_s, 3)
    summary.audio_hours = round(summary.audio_hours, 6)
    summary.audio_hours_now = round(summary.audio_hours_now, 6)
    return summary


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`1 file`, `2 files`; `nouns` where the plural is not noun + "s"."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def format_summary(summary: RunSummary) -> str:
    """The summary line (the run's one rate), then what else there is to say."""
    inputs = "tar shard" if summary.tar_inputs else "input"
    holds = (
        f"the output holds {plural(summary.files, 'file')}, {plural(summary.windows, 'window')}, "
        f"{plural(summary.errors, 'error row')} -> {summary.output}"
    )
    if summary.units_labeled or summary.units_failed:
        done = (
            f"done: {plural(summary.files_now, 'file')} labeled in {summary.wall_s:.1f} s "
            f"({summary.files_per_s:.1f} files/s, {summary.audio_hours_now:.3f} h of audio); "
        )
    else:
        done = "nothing new to label: "
    lines = [done + holds]
    if summary.already_labeled or summary.gone:
        lines.append(
            f"{plural(summary.inputs, inputs)}: {summary.already_labeled} labeled already, "
            f"{summary.new_inputs} new; {summary.gone} no longer in the input (their rows stay)"
        )
    if summary.inputs_skipped:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(summary.inputs_skipped.items()))
        lines.append(f"skipped (not inputs): {skipped}")
    reasons = sorted(summary.error_reasons.items(), key=lambda item: -item[1])
    for reason, count in reasons[:MAX_ERROR_REASONS_SHOWN]:
        lines.append(f"  error x{count}: {reason}")
    if summary.units_failed:
        lines.append(
            f"NOT COMMITTED: {plural(len(summary.units_failed), 'work unit')} (storage faults, "
            "not the data's); run the same command again to label them:"
        )
        for unit_id, reason in sorted(summary.units_failed.items())[:MAX_FAILURES_SHOWN]:
            lines.append(f"  {unit_id}: {reason}")
        if len(summary.units_failed) > MAX_FAILURES_SHOWN:
            lines.append(f"  ... and {len(summary.units_failed) - MAX_FAILURES_SHOWN} more")
    return "\n".join(lines)
