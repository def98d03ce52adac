"""What a labeling run did: the counts of its committed units, and the lines that say so."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.labeling.plan import WorkUnit
from pipeline.output.commit import CommittedUnit

# Reasons of units that did not commit shown in the summary (all are in summary.json).
MAX_FAILURES_SHOWN = 10


@dataclass
class RunSummary:
    output: str
    shards: int = 0
    files: int = 0
    windows: int = 0
    errors: int = 0
    audio_hours: float = 0.0
    wall_s: float = 0.0
    clips_per_s: float = 0.0
    audio_hours_per_s: float = 0.0
    units_skipped: int = 0
    units_labeled: int = 0
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
    units: list[WorkUnit],
    todo: list[WorkUnit],
    committed: dict[str, CommittedUnit],
    wall_s: float,
) -> RunSummary:
    planned = [committed[unit.unit_id] for unit in units if unit.unit_id in committed]
    labeled_now = {unit.unit_id for unit in todo}
    summary = RunSummary(output=output, wall_s=round(wall_s, 3))
    summary.shards = len(planned)
    summary.units_skipped = len(units) - len(todo)
    files_now = 0
    seconds_now = 0.0
    for unit in planned:
        summary.files += unit.files
        summary.windows += unit.windows
        summary.errors += unit.errors
        summary.audio_hours += unit.audio_seconds / 3600.0
        for reason, count in unit.error_reasons.items():
            summary.error_reasons[reason] = summary.error_reasons.get(reason, 0) + count
        if unit.unit_id in labeled_now:
            summary.units_labeled += 1
            files_now += unit.files
            seconds_now += unit.audio_seconds
    if wall_s > 0:
        summary.clips_per_s = round(files_now / wall_s, 3)
        summary.audio_hours_per_s = round(seconds_now / 3600.0 / wall_s, 6)
    summary.audio_hours = round(summary.audio_hours, 6)
    return summary


def format_summary(summary: RunSummary) -> str:
    lines = [
        f"shards {summary.shards} ({summary.units_labeled} labeled now, "
        f"{summary.units_skipped} already done)",
        f"files {summary.files}, windows {summary.windows}, error rows {summary.errors}",
        f"audio {summary.audio_hours:.3f} h in {summary.wall_s:.1f} s: "
        f"{summary.clips_per_s:.1f} clips/s, {summary.audio_hours_per_s * 3600:.1f} audio-s/s",
        f"output {summary.output}",
    ]
    if summary.inputs_skipped:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(summary.inputs_skipped.items()))
        lines.append(f"skipped (not inputs): {skipped}")
    for reason, count in sorted(summary.error_reasons.items(), key=lambda item: -item[1])[:5]:
        lines.append(f"  error x{count}: {reason}")
    if summary.units_failed:
        lines.append(
            f"NOT COMMITTED: {len(summary.units_failed)} units (storage faults, not the data's); "
            "run the same command again to label them:"
        )
        for unit_id, reason in sorted(summary.units_failed.items())[:MAX_FAILURES_SHOWN]:
            lines.append(f"  {unit_id}: {reason}")
        if len(summary.units_failed) > MAX_FAILURES_SHOWN:
            lines.append(f"  ... and {len(summary.units_failed) - MAX_FAILURES_SHOWN} more")
    return "\n".join(lines)
