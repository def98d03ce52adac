"""Search by example and near-duplicates over a finished output's stored window embeddings.

    windows.py          an output's embeddings read a row group at a time, in bounded memory
    query.py            the query: a clip embedded with the output's own model and settings,
                        or a file the output holds (--key)
    exact.py            exact search: one streaming pass, the best window of each file
    index_manifest.py   what the nearest-neighbour index holds (.ast-label/neighbours/)
    neighbour_index.py  building it (`ast-label index`): FAISS IVF-SQ8 segments, then the manifest
    index_search.py     searching its segments
    similar.py          `similar`: the index and exact search over what it does not cover ->
                        the best files, each read back for its windows and labels
    duplicates.py       `near-duplicates`: files whose every aligned window matches
    report.py, plot.py  text, JSON and CSV; the --plot picture
    scan_progress.py    the progress line of the long passes

Cosine similarity throughout: embeddings are compared at unit length. Every read of the output
goes through pipeline.output.reader (committed units only) and pipeline.storage.
"""
