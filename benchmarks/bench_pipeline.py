"""End-to-end cost of `ast-label run`: CPU-seconds per clip against the floor, clips/s against a
plain transformers loop, start-up, where the time goes, and peak memory.

    .venv/bin/python benchmarks/bench_pipeline.py                       # tiny model, 2000 clips
    .venv/bin/python benchmarks/bench_pipeline.py --clips 1000 --memory # and peak memory at 10x
    .venv/bin/python benchmarks/bench_pipeline.py --size base --clips 32 --small-clips 8

All figures come from one invocation, on the same generated corpus (10 s mono 16 kHz FLAC clips in
WebDataset tars of 50):
- floor: decode + fbank of 200 clips in this process, one thread (pipeline.audio +
  ast_model.features, batches of 16), the best of three warm passes: the work the pipeline
  exists to do;
- model: our AST forward on the same fbank, one thread (its work, without any threading cost);
- Ray's own floor: a fresh process that starts a local Ray and runs an empty Ray Data graph of
  the same shape (a read, one actor, one task stage): the start-up no Ray Data job avoids;
- ast-label run, twice (a small and the full corpus), each in a fresh process that starts its own
  local Ray: CPU-seconds of the whole run (utime + stime of the CLI and every process it starts,
  sampled from /proc), wall time, peak PSS, and the time from the command's start until its first
  classified batch is staged in the output (the first sign of labeling a user could see).
  marginal = (cpu_full - cpu_small) / (clips_full - clips_small); start-up = cpu_small -
  clips_small * marginal; outside the model = marginal - model;
- transformers loop: soundfile + ASTFeatureExtractor + ASTForAudioClassification, one file at a
  time (what a user would write first), clips/s;
- per stage: Ray Data's operator stats of the full run (from OUT/.ast-label/ray-data-stats.txt).
Compare ratios within one invocation only: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

HF_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(HF_OFFLINE)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ast_model.config import TINY_CONFIG  # noqa: E402

SIZES = {
    # ast_model's TINY_CONFIG (hidden 32, 2 layers, strides 16) keeps the pipeline's own costs
    # visible; "base" is AST-base as published: 768 hidden, 12 layers, strides 10.
    "tiny": {k: v for k, v in TINY_CONFIG.to_hf_dict().items() if not k.endswith(("label", "id"))},
    "base": dict(),
}
CLIP_S = 10.0
CLIPS_PER_SHARD = 50
FLOOR_BATCH = 16
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def write_checkpoint(size: str, directory: Path) -> Path:
    from transformers import ASTConfig, ASTForAudioClassification

    labels = [f"label {i}" for i in range(527)]
    config = ASTConfig(
        **SIZES[size],
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(0)
    ASTForAudioClassification(config).eval().save_pretrained(directory)
    return directory


def write_corpus(
    directory: Path, clips: int, seed: int = 0, clips_per_shard: int = CLIPS_PER_SHARD
) -> list[bytes]:
    """Tar shards of 10 s mono 16 kHz FLAC clips (tones in noise); returns each clip's bytes."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    clips_bytes = []
    t = np.arange(int(CLIP_S * 16_000)) / 16_000
    for _ in range(clips):
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
        wave = tone + 0.05 * rng.standard_normal(t.size)
        buffer = io.BytesIO()
        sf.write(buffer, wave.astype(np.float32), 16_000, format="FLAC")
        clips_bytes.append(buffer.getvalue())
    for shard_index, start in enumerate(range(0, clips, clips_per_shard)):
        with tarfile.open(directory / f"shard-{shard_index:06d}.tar", "w") as tar:
            for index in range(start, min(start + clips_per_shard, clips)):
                info = tarfile.TarInfo(f"clip-{index:06d}.flac")
                info.size = len(clips_bytes[index])
                tar.addfile(info, io.BytesIO(clips_bytes[index]))
    return clips_bytes


# --- references measured in this process ------------------------------------------------------


def floor_fbank(clips: list[bytes], repeats: int = 3) -> tuple[float, list[torch.Tensor]]:
    """CPU-seconds per clip of decode + window + fbank on one thread (the best of `repeats`
    passes after a warm-up, as the pipeline's long-lived workers run warm); and the fbank."""
    from ast_model.config import FbankConfig
    from ast_model.features import compute_fbank, pad_waveforms
    from pipeline.audio import cut_windows, decode_audio

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = FbankConfig()

    def one_pass(part: list[bytes]) -> list[torch.Tensor]:
        batches = []
        for first in range(0, len(part), FLOOR_BATCH):
            windows = []
            for data in part[first : first + FLOOR_BATCH]:
                decoded = decode_audio(data, "flac", 3600.0)
                cut = cut_windows(decoded.waveform, config.input_seconds)
                windows += [w.waveform for w in cut]
            batches.append(compute_fbank(*pad_waveforms(windows), config))
        return batches

    with torch.inference_mode():
        one_pass(clips[:FLOOR_BATCH])
        best = float("inf")
        for _ in range(repeats):
            started = time.process_time()
            batches = one_pass(clips)
            best = min(best, time.process_time() - started)
    torch.set_num_threads(threads)
    return best / len(clips), batches


def model_cpu(
    checkpoint: Path, batches: list[torch.Tensor], threads: int = 1, repeats: int = 3
) -> float:
    """CPU-seconds per clip of our model's forward (best of `repeats` passes after a warm-up)."""
    from ast_model.checkpoint import load_checkpoint

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = load_checkpoint(str(checkpoint)).model.eval()
    best = float("inf")
    with torch.inference_mode():
        model(batches[0])  # warm-up
        for _ in range(repeats):
            started = time.process_time()
            for batch in batches:
                model(batch)
            best = min(best, time.process_time() - started)
    torch.set_num_threads(previous)
    return best / sum(len(batch) for batch in batches)


def transformers_loop_s(checkpoint: Path, clips: list[bytes]) -> float:
    from transformers import ASTFeatureExtractor, ASTForAudioClassification

    extractor = ASTFeatureExtractor()
    model = ASTForAudioClassification.from_pretrained(checkpoint).eval()
    started = time.perf_counter()
    for data in clips:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        assert rate == 16_000
        inputs = extractor(wave.mean(axis=1), sampling_rate=16_000, return_tensors="pt")
        with torch.inference_mode():
            torch.sigmoid(model(**inputs).logits)
    return time.perf_counter() - started


# --- ast-label run in a fresh process ---------------------------------------------------------


@dataclass
class RunCost:
    clips: int
    wall_s: float
    cpu_s: float  # all processes of the run
    peak_pss_gib: float
    first_batch_s: float  # from the command's start until the first classified batch was staged
    stats: str  # Ray Data's operator stats
    by_process: dict[str, tuple[int, float]]  # process title -> (processes, CPU-seconds)


class SessionSampler:
    """CPU-seconds and peak PSS of every process in one session (the CLI and what it starts).

    A process's CPU is read from /proc until it exits; the last reading counts (sampled every
    0.1 s, so an exiting process's final tenth of a second may be missed: an undercount, small
    beside the totals). With `output`, also when the first classified batch reached it: the
    first part staged under OUTPUT/.ast-label/staging/ (or the first commit marker, should a unit
    be committed between two looks)."""

    def __init__(self, session_id: int, memory: bool, output: Path | None = None):
        self.session_id = session_id
        self.memory = memory
        self.output = output
        self.started = time.perf_counter()
        self.first_output_s = float("nan")
        self.cpu_ticks: dict[tuple[int, int], int] = {}  # (pid, start time) -> utime + stime
        self.names: dict[tuple[int, int], str] = {}  # (pid, start time) -> process title
        self.peak_pss = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        rounds = 0
        while not self.stop.is_set():
            pss = 0
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                    if int(fields[3]) != self.session_id:
                        continue
                    key = (int(stat.parent.name), int(fields[19]))
                    self.cpu_ticks[key] = int(fields[11]) + int(fields[12])
                    if not _names_work(self.names.get(key, "")):
                        title = _process_title(stat.parent)
                        if not self.names.get(key) or _names_work(title):
                            self.names[key] = title
                    if self.memory and rounds % 5 == 0:
                        for line in (stat.parent / "smaps_rollup").read_text().splitlines():
                            if line.startswith("Pss:"):
                                pss += int(line.split()[1]) * 1024
                except (OSError, ValueError, IndexError):
                    continue
            self.peak_pss = max(self.peak_pss, pss)
            if self.output is not None and self.first_output_s != self.first_output_s:
                if self._output_started():
                    self.first_output_s = time.perf_counter() - self.started
            rounds += 1
            time.sleep(0.1)

    def _output_started(self) -> bool:
        meta = self.output / ".ast-label"
        staged = any(meta.glob("staging/*/*.parquet"))
        return staged or any(meta.glob("commits/*.json"))

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu_ticks.values()) / CLOCK_TICKS

    def cpu_by_process(self) -> dict[str, tuple[int, float]]:
        """Process title -> (processes, CPU-seconds), e.g. raylet, gcs_server, ray::MapWorker."""
        grouped: dict[str, tuple[int, float]] = {}
        for key, ticks in self.cpu_ticks.items():
            count, seconds = grouped.get(self.names.get(key, "?"), (0, 0.0))
            grouped[self.names.get(key, "?")] = (count + 1, seconds + ticks / CLOCK_TICKS)
        return dict(sorted(grouped.items(), key=lambda item: -item[1][1]))


def _names_work(title: str) -> bool:
    """Whether a title says what a process does. A Ray worker starts as default_worker.py and
    is ray::IDLE between tasks; its first task or actor class names it for good."""
    return title.startswith("ray::") and title != "ray::IDLE"


def _process_title(proc: Path) -> str:
    """A short name for a process: Ray's task or actor class (ray::ReadWorkUnitSource,
    ray::_StatsActor: an actor's method calls count under its class), or the program's name."""
    words = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
    first = words[0]
    if first.startswith("ray::"):
        return first.split(" ")[0].split("(")[0].split(".")[0]
    program = os.path.basename(first)
    if program.startswith("python") and len(words) > 1:
        script = next((w for w in words[1:] if w and not w.startswith("-")), "")
        return os.path.basename(script) or program
    return program


def ast_label_command(code: Path | None = None) -> list[str]:
    """The `ast-label` command of this checkout, or of an earlier one at `code` (run with it as
    PYTHONPATH and working directory), whose command line may live in another module: its own
    pyproject.toml names it."""
    if code is None:
        return [str(Path(sys.executable).with_name("ast-label"))]
    scripts = tomllib.loads((Path(code) / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["ast-label"].split(":")
    return [sys.executable, "-c", f"from {module} import {function}; {function}()"]


def run_sampled(
    command: list[str],
    env: dict[str, str],
    cwd: Path | None = None,
    memory: bool = False,
    output: Path | None = None,
) -> tuple[int, str, float, SessionSampler]:
    """A command in a fresh session, sampled until its last process ends: (exit status, stderr,
    wall seconds, the sampler with its CPU-seconds, peak PSS and first output)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    sampler = SessionSampler(process.pid, memory, output)
    sampler.started = started
    sampler.thread.start()
    _, stderr = process.communicate()
    wall = time.perf_counter() - started
    time.sleep(0.3)  # Ray's processes end after the CLI; let the sampler see their last ticks
    sampler.stop.set()
    sampler.thread.join()
    return process.returncode, stderr.decode(errors="replace"), wall, sampler


def run_ast_label(
    corpus: Path,
    output: Path,
    checkpoint: Path,
    clips: int,
    memory: bool,
    extra: list[str],
    code: Path | None = None,
) -> RunCost:
    """`ast-label run` in a fresh process; with `code`, the ast-label of that checkout (an
    earlier commit, for a before/after in one invocation) instead of this one."""
    command = [
        *ast_label_command(code),
        "run",
        str(corpus),
        "--output",
        str(output),
        "--model",
        str(checkpoint),
        *extra,
    ]
    env = {**os.environ, **HF_OFFLINE, "RAY_ADDRESS": ""}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    # Ray puts the driver's working directory first on its workers' sys.path.
    returncode, stderr, wall, sampler = run_sampled(command, env, code, memory, output)
    if returncode != 0:
        raise SystemExit(f"ast-label run failed:\n{stderr[-3000:]}")
    summary_file = output / ".ast-label" / "summary.json"
    if not summary_file.exists():  # versions before 2026-11-25 kept it at the top
        summary_file = output / "_summary.json"
    summary = json.loads(summary_file.read_text())
    assert summary["files"] == clips and summary["errors"] == 0, summary
    stats_file = output / ".ast-label" / "ray-data-stats.txt"
    stats = stats_file.read_text() if stats_file.exists() else "(no stats file)"
    return RunCost(
        clips,
        wall,
        sampler.cpu_s,
        sampler.peak_pss / 2**30,
        sampler.first_output_s,
        stats,
        sampler.cpu_by_process(),
    )


RAY_DATA_FLOOR = """
import ray
ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
class Identity:
    def __call__(self, batch):
        return batch
dataset = ray.data.range(16, override_num_blocks=2).map_batches(
    Identity, compute=ray.data.ActorPoolStrategy(size=1), max_restarts=0
).map_batches(lambda batch: batch, num_cpus=0.25)
assert len(dataset.take_all()) == 16
"""


def ray_data_floor() -> float:
    """CPU-seconds of a process that starts a local Ray and runs an empty graph shaped like ours."""
    process = subprocess.Popen(
        [sys.executable, "-c", RAY_DATA_FLOOR],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    sampler = SessionSampler(process.pid, memory=False)
    sampler.thread.start()
    process.wait()
    time.sleep(0.3)
    sampler.stop.set()
    sampler.thread.join()
    return sampler.cpu_s


def marginal_and_startup(small: RunCost, full: RunCost) -> tuple[float, float]:
    marginal = (full.cpu_s - small.cpu_s) / (full.clips - small.clips)
    return marginal, small.cpu_s - small.clips * marginal


def stage_lines(stats: str) -> list[str]:
    """The per-operator headline and CPU lines of Ray Data's stats."""
    keep = ("Operator", "* Remote cpu time", "* Remote wall time", "* Output num rows per block")
    return [line.rstrip() for line in stats.splitlines() if line.strip().startswith(keep)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--clips", type=int, default=2000, help="Clips of the full run.")
    parser.add_argument(
        "--small-clips",
        type=int,
        default=400,
        help="Clips of the small run: enough units that it starts every process the full run does.",
    )
    parser.add_argument("--memory", action="store_true", help="Also peak memory at 10x clips.")
    parser.add_argument(
        "--run-args", default="", help="Extra `ast-label run` options, e.g. '--batch-size 32'."
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="A checkout of an earlier ast-label (git worktree add /tmp/before REV): its small "
        "and full runs are measured too, in this invocation, for a before/after.",
    )
    parser.add_argument(
        "--before-args", default="", help="`ast-label run` options for --before's runs."
    )
    args = parser.parse_args()
    extra = args.run_args.split()
    cpus = os.cpu_count() or 1

    with tempfile.TemporaryDirectory(prefix="ast-label-bench-") as scratch:
        root = Path(scratch)
        checkpoint = write_checkpoint(args.size, root / "model")
        clips = write_corpus(root / "corpus", args.clips)
        write_corpus(root / "small", args.small_clips)

        floor, batches = floor_fbank(clips[: min(len(clips), 200)])
        model = model_cpu(checkpoint, batches[:8])
        ray_floor = ray_data_floor()
        base_s = transformers_loop_s(checkpoint, clips)
        small = run_ast_label(
            root / "small", root / "out-small", checkpoint, args.small_clips, False, extra
        )
        full = run_ast_label(
            root / "corpus", root / "out", checkpoint, args.clips, args.memory, extra
        )

        marginal, startup = marginal_and_startup(small, full)
        outside = marginal - model
        print(
            f"model {args.size}; {args.clips} clips of {CLIP_S:g} s; {cpus} CPUs; "
            f"run args: {' '.join(extra) or '(defaults)'}"
        )
        print("CPU-seconds per clip (ms):")
        print(f"  floor: decode + fbank, 1 thread      {floor * 1e3:8.2f}")
        print(f"  model forward (1 thread)             {model * 1e3:8.2f}")
        print(f"  ast-label run, marginal              {marginal * 1e3:8.2f}")
        print(
            f"  ast-label run, outside the model     {outside * 1e3:8.2f}   "
            f"= {outside / floor:.2f}x the floor (target <= 1.5x)"
        )
        print(
            f"start-up CPU (Ray, actors, imports): {startup:.1f} s (target <= 20 s), of which "
            f"Ray + Ray Data alone take {ray_floor:.1f} s (an empty graph of the same shape); "
            f"small run {small.clips} clips {small.cpu_s:.1f} CPU-s, "
            f"full run {full.clips} clips {full.cpu_s:.1f} CPU-s"
        )
        print(
            f"first batch classified (staged in the output) {small.first_batch_s:.1f} s after the "
            f"command started (small run; full run {full.first_batch_s:.1f} s; target <= 10 s)"
        )
        print(
            f"clips/s: transformers loop {len(clips) / base_s:.1f}, ast-label run "
            f"{full.clips / full.wall_s:.1f} (start-up included, {full.wall_s:.1f} s wall): "
            f"{base_s / full.wall_s:.2f}x (target >= 1.5x)"
        )
        print("CPU-seconds by process (small run | full run):")
        for name in full.by_process:
            small_count, small_s = small.by_process.get(name, (0, 0.0))
            full_count, full_s = full.by_process[name]
            small_text = f"{small_count:3d} x {small_s:6.1f} s"
            print(f"  {name:32s} {small_text} | {full_count:3d} x {full_s:6.1f} s")
        print("where the time goes (Ray Data operator stats, full run):")
        for line in stage_lines(full.stats):
            print(f"  {line.strip()}")
        if args.before:
            before_extra = args.before_args.split()
            runs = [
                run_ast_label(root / corpus, root / f"before-{corpus}", checkpoint, count, False,
                              before_extra, code=args.before)
                for corpus, count in (("small", args.small_clips), ("corpus", args.clips))
            ]  # fmt: skip
            before_marginal, before_startup = marginal_and_startup(*runs)
            print(
                f"before ({args.before}, {' '.join(before_extra) or 'defaults'}): marginal "
                f"{before_marginal * 1e3:.2f} ms per clip, outside the model "
                f"{(before_marginal - model) * 1e3:.2f} = {(before_marginal - model) / floor:.2f}x "
                f"the floor; start-up {before_startup:.1f} s; first batch classified after "
                f"{runs[0].first_batch_s:.1f} s / {runs[1].first_batch_s:.1f} s (small / full); "
                f"{args.clips / runs[1].wall_s:.1f} "
                f"clips/s = {base_s / runs[1].wall_s:.2f}x the transformers loop"
            )
        if args.memory:
            write_corpus(root / "corpus10", args.clips * 10, seed=1)
            tenfold = run_ast_label(
                root / "corpus10", root / "out10", checkpoint, args.clips * 10, True, extra
            )
            print(
                f"peak memory (PSS, all processes): {full.peak_pss_gib:.2f} GiB at "
                f"{args.clips} clips, {tenfold.peak_pss_gib:.2f} GiB at {args.clips * 10} "
                f"({tenfold.peak_pss_gib / full.peak_pss_gib:.2f}x)"
            )


if __name__ == "__main__":
    main()
