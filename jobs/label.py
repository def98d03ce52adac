"""Ray job entry point: `python -m jobs.label INPUT... --output URI [options of ast-label run]`.

The `ast-label run` command itself, options, messages and exit statuses included. Inside a Ray job
RAY_ADDRESS is set, so the run joins the cluster that the job was submitted to.
"""

from __future__ import annotations

from pipeline.commands.cli_labeling import run_command

if __name__ == "__main__":
    run_command.main(prog_name="python -m jobs.label")
