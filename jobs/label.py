"""Ray job entry point: `python -m jobs.label INPUT... --output URI [options of ast-label run]`.

Inside a Ray job RAY_ADDRESS is set, so the run joins the cluster that the job was submitted to.
"""

from __future__ import annotations

from pipeline.cli import run

if __name__ == "__main__":
    run.main(prog_name="python -m jobs.label")
