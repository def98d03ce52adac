"""The query of `ast-label similar`: one window's embedding, from a clip or from the output.

    --to CLIP       the clip is read, windowed and embedded exactly as the output's files were:
                    the model, windows and fbank settings its metadata records (`predict`'s
                    Predictor); the loaded weights must be the output's (sha256), or it is refused
    --key SHARD:KEY a file the output holds: its stored window embeddings

Which window: the one covering --start-s, else the clip's best window, the one whose top label
scores highest (where the model hears its sound most clearly; a clip of up to one window has
only one).

Normalisation: an output made with `--norm-stats` recorded its fbank mean and std; a query is
embedded with the same ones only when --norm-stats names a file that holds them. Anything else
would embed the query on another scale, so it is refused rather than guessed.
"""

from __future__ import annotations

import math
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import UserError
from pipeline.output.reader import CommittedOutput, list_matrix
from pipeline.search.windows import READ_THREADS, in_order, search_dim
from pipeline.settings import LabelingOptions

# The query's top labels shown beside it.
QUERY_LABELS = 3
# Recorded and loaded fbank settings closer than this are the same (JSON round trips).
FEATURE_TOLERANCE = 1e-6
KEY_COLUMNS = ("shard", "key", "window_index", "start_s", "end_s", "duration_s", "error")


class QueryError(UserError):
    """The query cannot be made: no such file, a clip that cannot be read, another model."""


@dataclass(frozen=True)
class QueryRequest:
    clip: str | None = None  # --to
    key: str | None = None  # --key
    start_s: float | None = None
    model: str | None = None  # --model: where the output's model is, when its path is not
    norm_stats: str | None = None


@dataclass(frozen=True)
class Query:
    source: str  # the clip's URI, or the output's file as `file_name` shows it
    vector: np.ndarray  # (D,) float32, unit length
    window_index: int
    start_s: float
    end_s: float
    windows: int  # the query clip's windows
    labels: dict[str, float]  # the window's top labels
    own_file: tuple[str, str] | None = None  # (shard, key) with --key: left out of the results


def make_query(output: CommittedOutput, request: QueryRequest) -> Query:
    if (request.clip is None) == (request.key is None):
        raise QueryError("give either --to CLIP or --key SHARD:KEY")
    if request.start_s is not None and (request.start_s < 0 or not math.isfinite(request.start_s)):
        raise QueryError(f"--start-s {request.start_s} must be a time from 0 on, in seconds")
    search_dim(output)  # NoEmbeddings before any model is loaded
    if request.clip is not None:
        return _clip_query(output, request)
    if request.model or request.norm_stats:
        raise QueryError("--model and --norm-stats go with --to (a --key query is stored)")
    return _key_query(output, request)


def choose_window(
    start_s: np.ndarray, end_s: np.ndarray, scores: np.ndarray, at_s: float | None
) -> int:
    """The window covering `at_s` (the last one starting at or before it), else the window whose
    top label scores highest. start_s, end_s (W,); scores (W, C)."""
    if at_s is None:
        return int(np.argmax(scores.max(axis=1)))
    if at_s >= float(end_s.max()):
        raise QueryError(f"--start-s {at_s:g} is past the query's end ({float(end_s.max()):.2f} s)")
    return int(np.flatnonzero(start_s <= at_s + 1e-9)[-1])


def _unit_vector(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm) or norm == 0:
        raise QueryError("the query window's embedding is zero or not finite: choose another")
    return vector / norm


def _top(label_names: tuple[str, ...], scores: np.ndarray) -> dict[str, float]:
    top = np.argsort(-scores, kind="stable")[:QUERY_LABELS]
    return {label_names[i]: round(float(scores[i]), 4) for i in top if i < len(label_names)}


# --- a clip, embedded as the output's files were -------------------------------------------------


def embedding_options(output: CommittedOutput, request: QueryRequest) -> LabelingOptions:
    """The labeling options that reproduce the output's embeddings: its model (or --model), its
    windows, and --norm-stats when the output was made with one."""
    from ast_model.checkpoint_files import DEFAULT_MODEL_NAME
    from ast_model.config import DEFAULT_MODEL

    recorded = output.model
    model = request.model or (DEFAULT_MODEL if recorded == DEFAULT_MODEL_NAME else recorded)
    window_s = output.metadata.get("window_s")
    hop_s = output.metadata.get("hop_s")
    return LabelingOptions(
        model=model,
        window_s=window_s,
        hop_s=hop_s,
        allow_gaps=bool(window_s and hop_s and hop_s > window_s),
        norm_stats=request.norm_stats,
    )


def _clip_query(output: CommittedOutput, request: QueryRequest) -> Query:
    from ast_model.checkpoint_files import CheckpointError
    from pipeline.commands.predict import PredictConfig, Predictor

    options = embedding_options(output, request)
    try:
        predictor = Predictor(PredictConfig((str(request.clip),), None, options))
    except CheckpointError as error:
        if request.model:
            raise
        raise QueryError(
            f"cannot load {output.model}, the model {output.uri} was made with ({error}); "
            "pass --model with a copy of it"
        ) from None
    check_same_model(output, predictor.loaded.name, predictor.loaded.weights_sha256)
    check_same_features(output, asdict(predictor.read.features.fbank), request.norm_stats)
    results = list(predictor.label(predictor.plan().units))
    if len(results) != 1:
        raise QueryError(f"--to {request.clip} names {len(results)} files: give one audio file")
    (result,) = results
    if result.error is not None or not result.windows:
        raise QueryError(f"cannot embed {request.clip}: {result.error or 'no windows'}")
    windows = result.windows
    start_s = np.array([w.start_s for w in windows])
    end_s = np.array([w.end_s for w in windows])
    scores = np.stack([w.scores for w in windows])  # (W, C)
    chosen = choose_window(start_s, end_s, scores, request.start_s)
    return Query(
        source=str(request.clip),
        vector=_unit_vector(windows[chosen].embedding),
        window_index=windows[chosen].index,
        start_s=float(start_s[chosen]),
        end_s=float(end_s[chosen]),
        windows=len(windows),
        labels=_top(output.label_names, scores[chosen]),
    )


def check_same_model(output: CommittedOutput, model: str, weights_sha256: str) -> None:
    recorded = str(output.metadata.get("weights_sha256", ""))
    if weights_sha256 != recorded:
        raise QueryError(
            f"{output.uri} was made by another model ({output.model}, weights "
            f"{recorded[:12]}) than the query's ({model}, weights {weights_sha256[:12]}): "
            "similarities across models mean nothing; pass --model with the output's model"
        )


def check_same_features(output: CommittedOutput, loaded: dict, norm_stats: str | None) -> None:
    """The query's fbank settings (FbankConfig fields) must be the output's."""
    recorded = output.metadata.get("features") or {}
    differ = [
        name
        for name, value in recorded.items()
        if name in loaded and not _same(value, loaded[name])
    ]
    if not differ:
        return
    settings = ", ".join(f"{name} {recorded[name]} (query: {loaded[name]})" for name in differ)
    if set(differ) <= {"mean", "std"}:
        fix = (
            "pass --norm-stats with the file the output was made with"
            if norm_stats is None
            else f"--norm-stats {norm_stats} is not the file it was made with"
        )
        raise QueryError(
            f"{output.uri} normalises fbank otherwise than the query ({settings}): {fix}"
        )
    raise QueryError(f"the query's fbank settings are not {output.uri}'s: {settings}")


def _same(recorded, loaded) -> bool:
    if isinstance(recorded, int | float) and isinstance(loaded, int | float):
        return abs(float(recorded) - float(loaded)) <= FEATURE_TOLERANCE * max(1.0, abs(recorded))
    return recorded == loaded


# --- a file the output holds ----------------------------------------------------------------


def _key_query(output: CommittedOutput, request: QueryRequest) -> Query:
    rows = find_file(output, str(request.key))
    ok = np.asarray(pc.is_null(rows["error"])) & np.asarray(pc.is_valid(rows["embedding"]))
    if not ok.any():
        reason = rows["error"].drop_null()
        why = f": {reason[0].as_py()}" if len(reason) else ""
        raise QueryError(f"--key {request.key}: that file has no embedding{why}")
    rows = rows.filter(pa.array(ok))
    dim = search_dim(output)
    vectors = list_matrix(rows["embedding"], dim)  # (W, D)
    scores = list_matrix(rows["scores"], len(output.label_names))  # (W, C)
    start_s = np.asarray(rows["start_s"], dtype=np.float64)
    end_s = np.asarray(rows["end_s"], dtype=np.float64)
    chosen = choose_window(start_s, end_s, scores, request.start_s)
    shard, key = rows["shard"][0].as_py(), rows["key"][0].as_py()
    return Query(
        source=_shown(shard, key),
        vector=_unit_vector(vectors[chosen]),
        window_index=int(rows["window_index"][chosen].as_py()),
        start_s=float(start_s[chosen]),
        end_s=float(end_s[chosen]),
        windows=rows.num_rows,
        labels=_top(output.label_names, scores[chosen]),
        own_file=(shard, key),
    )


def find_file(output: CommittedOutput, name: str) -> pa.Table:
    """The rows of the file `name` (SHARD:KEY as inspect and similar show it, the shard's full
    URI:KEY, or a plain file's URI), in window order. First a scan of the shard and key columns
    alone (many shards may hold the same key), then the file's own unit file."""
    splits = [(name[:i], name[i + 1 :]) for i, char in enumerate(name) if char == ":"]
    wanted = pc.field("key").isin(sorted({name, *(key for _, key in splits)}))
    fragments = list(output.dataset().get_fragments())

    def names(fragment) -> set[tuple[str, str, str]]:
        table = output.read_unit_file(
            lambda: fragment.to_table(columns=["shard", "key"], filter=wanted), fragment.path
        )
        pairs = zip(table["shard"].to_pylist(), table["key"].to_pylist(), strict=True)
        return {
            (shard, key, fragment.path)
            for shard, key in pairs
            if key == name
            or any(k == key and s in (shard, posixpath.basename(shard)) for s, k in splits)
        }

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        matches = sorted(set().union(*in_order(pool, names, fragments, 2 * READ_THREADS)))
    if not matches:
        raise QueryError(
            f"--key {name}: no such file in {output.uri}; give it as `similar` and `inspect` "
            "show it: SHARD:KEY for a tar member (shard-000000.tar:clip-1), or a plain file's URI"
        )
    if len(matches) > 1:
        shown = ", ".join(f"{shard}:{key}" for shard, key, _ in matches[:3])
        raise QueryError(f"--key {name} names {len(matches)} files ({shown}): give the shard's URI")
    shard, key, path = matches[0]
    fragment = next(f for f in fragments if f.path == path)
    this_file = (pc.field("shard") == shard) & (pc.field("key") == key)
    columns = [*KEY_COLUMNS, "scores", "embedding"]
    rows = output.read_unit_file(lambda: fragment.to_table(columns=columns, filter=this_file), path)
    return rows.take(pc.sort_indices(rows, [("window_index", "ascending")]))


def _shown(shard: str, key: str) -> str:
    from pipeline.commands.inspect_report import file_name

    return file_name(shard, key)
