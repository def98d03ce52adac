"""The output format: Parquet unit files with an exactly-once commit per work unit.

    layout.py   where everything of an output lives (OutputLocation), the files that describe it
    schema.py   the columns and file metadata (OutputSpec), rows -> Arrow
    staging.py  a batch of classified rows -> staged parts (in the classifier actors)
    commit.py   the commit protocol: staged parts -> one unit file and its marker (the driver)
    index.py    every commit marker of an output, read fast through one index file
    reader.py   a finished output: which unit files are committed (the one rule), their metadata
    resume.py   before a run: what to skip, what refuses to mix, --overwrite
"""
