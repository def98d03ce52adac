"""The commands that read a finished output: `inspect` (counts, labels, timelines), `similar`
(search by example), `index` (its nearest-neighbour index), `near-duplicates`."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from pipeline import defaults
from pipeline.commands.cli_core import main, note

# --- inspect -------------------------------------------------------------------------------------


JSON_OBJECT = click.option(
    "--json", "as_json", is_flag=True, help="One JSON object on stdout instead of text."
)


def plot_option(what: str):
    """--plot FILE, the picture being `what`."""
    return click.option(
        "--plot",
        metavar="FILE",
        type=click.Path(dir_okay=False, path_type=Path),
        help=f"Also draw {what}. Needs the plot extra (matplotlib).",
    )


@main.command("inspect")
@click.argument("output")
@click.option("--label", "-l", help="Show the files where this label scores at least --min-score.")
@click.option(
    "--min-score",
    type=float,
    help="With --label: the score a window must reach (the max over a file's windows counts) "
    f"[default: a head label's threshold, else {defaults.INSPECT_MIN_SCORE}].",
)
@click.option(
    "--top",
    default=defaults.INSPECT_TOP,
    show_default=True,
    type=click.IntRange(min=0),
    help="Rows shown per table (0: all).",
)
@plot_option(
    "the label distribution and long files' timelines: FILE.png (.svg, .pdf), or FILE.html for "
    "a report with the tables"
)
@JSON_OBJECT
def inspect_command(
    output: str,
    label: str | None,
    min_score: float | None,
    top: int,
    plot: Path | None,
    as_json: bool,
) -> None:
    """Counts, label distribution and label queries of an output folder or URI (s3://...)."""
    from pipeline.commands.inspect_report import format_inspection, inspection_json
    from pipeline.commands.inspection import TIMELINE_FILES, inspect_output

    if plot is not None:
        from pipeline.commands.plots import check_plot_path

        check_plot_path(plot)  # before reading the whole output
    inspection = inspect_output(
        output, label, min_score, timelines=TIMELINE_FILES if plot is not None else 0
    )
    if as_json:
        click.echo(json.dumps(inspection_json(inspection, top)))
    else:
        click.echo(format_inspection(inspection, top))
    if plot is not None:
        from pipeline.commands.plots import write_plot

        note(f"wrote {write_plot(inspection, plot, top)}")


# --- search ------------------------------------------------------------------------------------


def _search_progress():
    """The progress lines of search's long passes, on stderr (pipeline.search.scan_progress)."""
    from pipeline.search.scan_progress import ProgressLines

    write = functools.partial(click.echo, err=True, nl=False)
    return ProgressLines(write=write, live=sys.stderr.isatty())


@main.command("similar")
@click.argument("output")
@click.option(
    "--to",
    "clip",
    metavar="CLIP",
    help="An audio file or URI to find sounds like: embedded with the output's own model, "
    "windows and fbank settings.",
)
@click.option(
    "--key",
    metavar="SHARD:KEY",
    help="A file the output holds, as similar and inspect show it (shard-000000.tar:clip-1, or "
    "a plain file's URI); it is left out of the results.",
)
@click.option(
    "--start-s",
    type=float,
    help="Search with the query's window that covers this time (s) [default: its best window, "
    "the one whose top label scores highest].",
)
@click.option(
    "--k",
    "-k",
    "k",
    default=defaults.SIMILAR_K,
    show_default=True,
    type=click.IntRange(min=1),
    help="Files to list.",
)
@click.option(
    "--min-similarity",
    type=click.FloatRange(-1.0, 1.0),
    help="Only files whose best window reaches this cosine similarity.",
)
@click.option(
    "--exact", is_flag=True, help="Search every window exactly, even where there is an index."
)
@click.option(
    "--model",
    "-m",
    help="With --to: the output's model, where the path it recorded is not reachable from here "
    "(the weights must be the output's).",
)
@click.option(
    "--norm-stats",
    help="With --to, for an output made with --norm-stats: the same norm-stats JSON.",
)
@plot_option("the ranking and where in each file the match lies: FILE.png (.svg, .pdf)")
@JSON_OBJECT
def similar_command(output: str, plot: Path | None, as_json: bool, **options) -> None:
    """The files of OUTPUT that sound most like a clip (--to) or one of its files (--key): the
    cosine similarity of embeddings, each file's best window against the query's window. Uses
    the index of `ast-label index` where there is one, and searches exactly what it does not
    cover (units committed since)."""
    from pipeline.search.query import QueryRequest
    from pipeline.search.report import format_similar, similar_json
    from pipeline.search.similar import find_similar

    if plot is not None:
        from pipeline.search.plot import check_similar_plot

        check_similar_plot(plot)  # before any work
    search = {name: options.pop(name) for name in ("k", "min_similarity", "exact")}
    progress = _search_progress()
    try:
        result = find_similar(output, QueryRequest(**options), progress=progress, **search)
    finally:
        progress.finish()
    click.echo(json.dumps(similar_json(result)) if as_json else format_similar(result))
    if plot is not None:
        from pipeline.search.plot import write_similar_plot

        note(f"wrote {write_similar_plot(result, plot)}")


@main.command("index")
@click.argument("output")
@click.option(
    "--rebuild",
    is_flag=True,
    help="Index every unit again, instead of adding the units committed since the last index.",
)
def index_command(output: str, rebuild: bool) -> None:
    """Build the nearest-neighbour index of OUTPUT's embeddings that `similar` uses (under
    OUTPUT/.ast-label/neighbours/), or add the units committed since it was built. Until it is
    rerun, `similar` searches those units exactly: no result is missed for being new."""
    from pipeline.labeling.summary import plural
    from pipeline.output.reader import open_output
    from pipeline.search.neighbour_index import update_index

    opened = open_output(output)
    progress = _search_progress()
    try:
        report = update_index(
            opened, rebuild, note=note, progress=lambda units: progress("index", units)
        )
    finally:
        progress.finish()
    manifest = report.manifest
    if report.rebuilt_reason:
        note(f"indexed every unit again: {report.rebuilt_reason}")
    done = (
        f"indexed {plural(report.units_indexed, 'unit')} ({report.units_new} new; "
        f"{plural(report.windows_added, 'window')}, {report.bytes_written / 2**20:.1f} MiB)"
        if report.units_indexed
        else "the index is up to date"
    )
    units = sum(len(segment.units) for segment in manifest.segments)
    click.echo(
        f"{output}: {done}; it covers {plural(units, 'unit')}, "
        f"{plural(manifest.windows, 'window')} in {plural(len(manifest.segments), 'segment')}"
    )


@main.command("near-duplicates")
@click.argument("output")
@click.option(
    "--min-similarity",
    default=defaults.DUPLICATE_MIN_SIMILARITY,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, min_open=True),
    help="The file similarity (the lowest cosine over aligned windows of two files of the same "
    "duration) from which files count as the same recording.",
)
@click.option(
    "--csv",
    "csv_file",
    metavar="FILE",
    help="Write one row per file of a group (group, keep, file, shard, key, windows, duration_s, "
    "similarity) to FILE or URI, '-' for stdout; drop the rows where keep is false.",
)
@JSON_OBJECT
@click.option(
    "--top",
    default=defaults.INSPECT_TOP,
    show_default=True,
    type=click.IntRange(min=0),
    help="Groups shown as text (0: all).",
)
def near_duplicates_command(
    output: str, min_similarity: float, csv_file: str | None, as_json: bool, top: int
) -> None:
    """Groups of OUTPUT's files that are the same recording (another codec, gain or name): every
    window of one matches the same window of the other. Keep the first file of each group."""
    from pipeline.search.duplicates import find_near_duplicates
    from pipeline.search.report import duplicates_csv, duplicates_json, format_duplicates
    from pipeline.storage import filesystem_for, put_file

    if csv_file == "-" and as_json:
        raise click.UsageError("--csv - and --json both write to stdout: give --csv a file")
    progress = _search_progress()
    try:
        report = find_near_duplicates(output, min_similarity, progress=progress)
    finally:
        progress.finish()
    if csv_file == "-":
        click.echo(duplicates_csv(report), nl=False)
    elif csv_file:
        put_file(*filesystem_for(csv_file), duplicates_csv(report).encode())
        note(f"wrote {csv_file}")
    if as_json:
        click.echo(json.dumps(duplicates_json(report)))
    elif csv_file != "-":
        click.echo(format_duplicates(report, top))
