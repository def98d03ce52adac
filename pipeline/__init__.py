"""ast-label's pipeline, laid out along the way a clip travels (ast_model holds the model):

    labeling/   plan -> read -> classify -> commit: the work units, the read stage, the classifier,
                the Ray Data graph and the run that drives them (run.py: the whole flow)
    output/     the output format: schema, staging, the commit protocol, and reading a finished
                output (the one place that knows which units are committed)
    heads/      your own labels: a head's format, its training (`head train`), `relabel`
    search/     search by example and near-duplicates over the stored embeddings
    commands/   the command line (cli.py gathers cli_*.py) and what each command adds: predict,
                inspect and its plots, demo, norm-stats, submit
    and below them, the shared ground: settings.py (every option, checked once), defaults.py,
    errors.py, rows.py (the columns between stages), storage.py (filesystems, retries, atomic
    writes), formats.py + audio.py (decode, resample, window), normalisation.py, cluster.py.
"""
