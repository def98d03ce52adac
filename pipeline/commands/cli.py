"""The `ast-label` command line: the group and its exit statuses (cli_core.py), and every command,
registered on it by the module that defines it. The Ray jobs (`python -m jobs.label`,
`python -m jobs.norm_stats`) run these same commands.

    cli_labeling.py  predict, run, relabel, demo, norm-stats
    cli_heads.py     head train
    cli_output.py    inspect, similar, index, near-duplicates
    cli_cluster.py   submit, status, stop

torch, Ray and the model code load inside the commands that need them: `ast-label submit`,
`status` and `--help` answer in a fraction of a second.
"""

# Each module registers its commands on `main` as it is imported.
from pipeline.commands import cli_cluster, cli_heads, cli_labeling, cli_output  # noqa: F401
from pipeline.commands.cli_core import EXIT_STATUSES, exit_status, main  # noqa: F401
