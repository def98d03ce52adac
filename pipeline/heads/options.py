"""`head train`'s options: defaults written once (the CLI shows them), and every check that
needs no example read. Light to import: the CLI reads the defaults without loading
scikit-learn or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import UserError
from pipeline.settings import LabelingOptions

DEFAULT_FOLDS = 5
DEFAULT_C = 1.0
# Up to this many example files, embeddings are computed in this process (predict's way): Ray's
# start-up (about 15 CPU-s) pays only once the labeling itself takes minutes.
DEFAULT_RAY_ABOVE = 500


@dataclass(frozen=True)
class TrainConfig:
    examples: str  # a folder of label folders, or a .csv/.parquet manifest
    output: str  # the head's folder
    model: str | None = None  # None: the bundled model, or with from_output the output's
    from_output: str | None = None  # embeddings from this output's rows instead of audio
    multi_label: bool = False  # sigmoid labels even when every example has one label
    folds: int = DEFAULT_FOLDS
    target_precision: float | None = None  # None: each label's threshold at its best F1
    c: float = DEFAULT_C
    seed: int = 0
    plot: str | None = None
    overwrite: bool = False
    options: LabelingOptions = field(default_factory=LabelingOptions)  # model: see `model`
    ray_above: int = DEFAULT_RAY_ABOVE
    scratch: str | None = None  # the Ray labeling's output (kept); None: a temporary folder
    address: str | None = None  # a Ray cluster for the labeling

    def check(self) -> None:
        """Raises UserError for options out of range, before anything is read."""
        problems = []
        if self.folds < 2:
            problems.append("--folds must be at least 2")
        if self.target_precision is not None and not 0 < self.target_precision <= 1:
            problems.append("--target-precision must be in (0, 1]")
        if self.c <= 0:
            problems.append("--c must be positive")
        if self.ray_above < 0:
            problems.append("--ray-above must be at least 0")
        if self.from_output:
            given = [
                name
                for name, value in (
                    ("--window-s", self.options.window_s),
                    ("--hop-s", self.options.hop_s),
                    ("--norm-stats", self.options.norm_stats),
                    ("--scratch", self.scratch),
                )
                if value is not None
            ]
            if given:
                problems.append(f"{given[0]} does not go with --from-output (its rows are used)")
        if problems:
            raise UserError("; ".join(problems))
        if self.plot is not None:
            from pipeline.commands.plots import check_plot_path

            check_plot_path(self.plot)
        if not self.from_output:
            self.options.check()
        _check_head_folder(self.output, self.overwrite)


def _check_head_folder(folder: str, overwrite: bool) -> None:
    """HeadError when --output is a file, or a folder with files in it and no --overwrite."""
    from pipeline.heads.head import HeadError
    from pipeline.storage import filesystem_for, with_retries

    fs, root = filesystem_for(folder)
    if not with_retries(lambda: fs.exists(root), f"cannot look at {folder}"):
        return
    if not with_retries(lambda: fs.isdir(root), f"cannot look at {folder}"):
        raise HeadError(f"--output {folder} is a file: give a folder for the head")
    if not overwrite and with_retries(lambda: fs.ls(root), f"cannot list {folder}"):
        raise HeadError(
            f"--output {folder} already holds files: give a new folder, or --overwrite to "
            "replace the head in it"
        )
