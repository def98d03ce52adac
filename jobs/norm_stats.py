"""Ray job entry point: `python -m jobs.norm_stats INPUT... --output FILE [--manifest M]`.

The `ast-label norm-stats` command itself: writes the corpus's fbank mean and std as JSON for
`ast-label run --norm-stats FILE`. Inside a Ray job RAY_ADDRESS is set, so the measurement runs on
the cluster the job was submitted to.
"""

from __future__ import annotations

from pipeline.commands.cli_labeling import norm_stats_command

if __name__ == "__main__":
    norm_stats_command.main(prog_name="python -m jobs.norm_stats")
