"""A corpus's own fbank mean and std: the JSON file `ast-label norm-stats` writes and
`ast-label run --norm-stats FILE` reads.

AST normalises its input as (fbank - mean) / (2 * std) with AudioSet's statistics; its
documentation advises using the dataset's own statistics when the audio differs from AudioSet.
pipeline.commands.norm_stats measures them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

from ast_model.config import FbankConfig
from pipeline.errors import UserError
from pipeline.storage import StorageError, error_reason, filesystem_for, is_local, with_retries

T = TypeVar("T")
NUM_MEL_BINS = FbankConfig().num_mel_bins


class NormStatsError(UserError):
    """A norm stats file that cannot be read or used, or a corpus with nothing to measure."""


@dataclass(frozen=True)
class NormStats:
    mean: float
    std: float
    frames: int = 0  # real fbank frames measured
    files: int = 0  # files decoded
    errors: int = 0  # files that could not be read or decoded (left out)
    source: tuple[str, ...] = ()  # the inputs as given, then the manifest if any
    num_mel_bins: int = NUM_MEL_BINS

    def to_dict(self) -> dict:
        return {**asdict(self), "source": list(self.source)}

    def save(self, uri: str) -> None:
        """Writes the JSON to a local path or an object-store URI (one PUT)."""
        fs, path = filesystem_for(uri)
        if is_local(uri):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError as error:  # a file in the way
                raise NormStatsError(f"cannot write {uri}: {error_reason(error)}") from None
        data = (json.dumps(self.to_dict(), indent=2) + "\n").encode()
        _stats_file_call(lambda: fs.pipe_file(path, data), f"cannot write {uri}")

    @classmethod
    def load(cls, uri: str) -> NormStats:
        fs, path = filesystem_for(uri)
        text = _stats_file_call(lambda: fs.cat_file(path), f"cannot read norm stats file {uri}")
        try:
            data = json.loads(text)
        except ValueError:  # UnicodeDecodeError included
            raise NormStatsError(f"{uri} is not JSON; expected the output of norm-stats") from None
        try:
            stats = cls(
                mean=float(data["mean"]),
                std=float(data["std"]),
                frames=int(data.get("frames", 0)),
                files=int(data.get("files", 0)),
                errors=int(data.get("errors", 0)),
                source=tuple(str(item) for item in data.get("source", ())),
                num_mel_bins=int(data.get("num_mel_bins", NUM_MEL_BINS)),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise NormStatsError(
                f'{uri} is not a norm stats file: expected JSON with numbers "mean" and "std"'
            ) from None
        if not (math.isfinite(stats.mean) and math.isfinite(stats.std) and stats.std > 0):
            raise NormStatsError(
                f"{uri}: mean must be finite and std positive, got {stats.mean}, {stats.std}"
            )
        return stats


# Failures of the stats file's read or write that the user can fix (the path, permissions).
_USER_FIXABLE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _stats_file_call(call: Callable[[], T], what: str) -> T:
    """A read or write of a stats file, retried as every storage call is. What the user can fix
    is a NormStatsError (exit 2); a store that keeps failing stays a StorageError (exit 3: run the
    same command again)."""
    try:
        return with_retries(call, what)
    except StorageError as error:
        if isinstance(error.__cause__, _USER_FIXABLE):
            raise NormStatsError(str(error)) from None
        raise
