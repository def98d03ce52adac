"""The command layer: every command, one line per error a user can fix, one table of exit statuses.

Errors are checked on real inputs (files, the S3 server on 127.0.0.1, a tiny checkpoint), before
any Ray work; a few run the installed console script and `python -m jobs.*`, as users and Ray
jobs do.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from audio_corpus import encode, sine
from click.testing import CliRunner
from conftest import free_port

from ast_model.checkpoint_files import CheckpointError
from pipeline.commands.cli import EXIT_STATUSES, exit_status, main
from pipeline.errors import Interrupted, RunIncomplete, UserError, WorkFailed
from pipeline.storage import StorageError

REPO = Path(__file__).resolve().parent.parent
AST_LABEL = Path(sys.executable).parent / "ast-label"
# A secret that must never be printed, whatever fails.
SECRET = "wrong-secret-7f3a9c1e5b"


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error")]


@pytest.fixture()
def audio(tmp_path) -> Path:
    path = tmp_path / "clip.wav"
    path.write_bytes(encode(sine(1.0), 16_000, "wav"))
    return path


def test_help_lists_every_command_and_the_exit_statuses():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("predict", "run", "demo", "norm-stats", "submit", "status", "stop"):
        assert f"  {command} " in result.output
    for status, _, meaning in EXIT_STATUSES:
        assert f"{status:<4} {meaning}" in result.output


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["run", "{tmp}/missing/*.tar", "--output", "{tmp}/out"], "missing"),
        (["run", "{audio}", "--output", "{tmp}/out", "--model", "{tmp}/no-model"], "no-model"),
        (["run", "{audio}", "--output", "{tmp}/out", "--top-k", "0"], "--top-k"),
        (["run", "{audio}", "--output", "{tmp}/out", "--precision", "fp8"], "--precision"),
        (["run", "{audio}", "--output", "{audio}"], "is a file, not a folder"),
        (["run", "{audio}", "--output", "{tmp}/out", "--window-s", "20"], "longer than the model"),
        (
            ["run", "{audio}", "--output", "{tmp}/out", "--window-s", "0.01"],
            "--window-s 0.01 is shorter than one fbank frame (0.025 s)",
        ),
        (["predict", "{tmp}/x.wav", "--model", "{tmp}/no-model"], "no-model"),
        (["predict", "{tmp}/x.wav"], "input not found"),
        (["predict"], "give at least one INPUT or --manifest"),
        (["predict", "{audio}", "--scores"], "--scores and --embedding go with --json"),
        (["predict", "{audio}", "--batch-size", "0"], "--batch-size"),
        (["norm-stats", "{tmp}/missing.wav", "--output", "{tmp}/s.json"], "missing.wav"),
        (["submit", "--address", "http://127.0.0.1:1", "--", "predict", "x"], "unknown job"),
        (["submit", "--address", "http://127.0.0.1:1"], "name the job after '--'"),
        (["status", "--address", "127.0.0.1:8265", "raysubmit_x"], "Jobs API URL"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(
    tmp_path, audio, tiny_hf_checkpoint, arguments, message
):
    filled = [a.format(tmp=tmp_path, audio=audio) for a in arguments]
    if filled and filled[0] in ("run", "predict") and "--model" not in filled:
        filled += ["--model", str(tiny_hf_checkpoint)]
    result = CliRunner().invoke(main, filled)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(error_lines(result.output)) == 1, result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
@pytest.mark.parametrize("command", ["run", "predict"])
def test_device_cuda_without_a_gpu_is_one_line(command, tmp_path, audio, tiny_hf_checkpoint):
    arguments = [command, str(audio), "--device", "cuda", "--model", str(tiny_hf_checkpoint)]
    if command == "run":
        arguments += ["--output", str(tmp_path / "out")]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        "Error: --device cuda: this machine has no usable GPU; use --device cpu or auto"
    ]


@pytest.mark.parametrize(
    "error, status",
    [
        (WorkFailed("2 of 5 files could not be labeled"), 1),
        (UserError("--top-k must be at least 1"), 2),
        (CheckpointError("model 'x' not found"), 2),
        (RunIncomplete("3 work units did not commit"), 3),
        (Interrupted("stopped following job raysubmit_1"), 130),
        (KeyboardInterrupt(), 130),
    ],
)
def test_every_command_maps_errors_to_one_line_and_the_same_exit_status(error, status):
    @click.command(cls=main.command_class)
    def failing() -> None:
        raise error

    result = CliRunner().invoke(failing)
    assert result.exit_code == status
    assert error_lines(result.output) == [f"Error: {str(error) or 'interrupted'}"]
    if not isinstance(error, KeyboardInterrupt):
        assert exit_status(error) == status


def test_a_store_that_keeps_failing_is_one_line_saying_to_run_again():
    @click.command(cls=main.command_class)
    def failing() -> None:
        raise StorageError("cannot list s3://b/out: OSError: We encountered an internal error")

    result = CliRunner().invoke(failing)
    assert result.exit_code == 3
    assert error_lines(result.output) == [
        "Error: cannot list s3://b/out: OSError: We encountered an internal error: the store "
        "kept failing; run the same command again"
    ]


def test_bugs_keep_their_traceback():
    @click.command(cls=main.command_class)
    def buggy() -> None:
        raise ZeroDivisionError("a bug")

    result = CliRunner().invoke(buggy)
    assert isinstance(result.exception, ZeroDivisionError)
    assert exit_status(result.exception) is None


def test_secret_values_never_appear_in_a_message(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)

    @click.command(cls=main.command_class)
    def leaky() -> None:
        raise UserError(f"the store said: signature {SECRET} does not match")

    result = CliRunner().invoke(leaky)
    assert result.exit_code == 2
    assert SECRET not in result.output
    assert "signature *** does not match" in result.output


# --- a model on S3 that cannot be read: the installed command, in a process of its own ---------


def s3_environment(endpoint: str, **overrides: str | None) -> dict[str, str]:
    """The process environment for the S3 server, without any credential file or instance
    metadata to fall back on; `overrides` set (or, with None, remove) AWS variables."""
    env = dict(os.environ)
    env.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_CONFIG_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_MAX_ATTEMPTS="1",  # an unreachable store fails in seconds, not after 10 tries
    )
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def ast_label(*arguments: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(AST_LABEL), *arguments], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing bucket, wrong keys", "not found"),
        ("no credentials", "no usable credentials"),
        ("store unreachable", "cannot reach the store"),
    ],
)
def test_unreadable_s3_model_is_one_line_without_secrets(s3_server, audio, case, message):
    endpoint, keys = (
        s3_server.endpoint_url,
        {
            "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG",
            "AWS_SECRET_ACCESS_KEY": SECRET,
        },
    )
    if case == "no credentials":
        keys = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}
    elif case == "store unreachable":
        endpoint = f"http://127.0.0.1:{free_port()}"
    model = "s3://no-such-bucket-for-models/ast"
    result = ast_label(
        "predict", str(audio), "--model", model, env=s3_environment(endpoint, **keys)
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
    assert message in result.stderr and model in result.stderr
    assert SECRET not in result.stderr


def test_run_with_an_s3_model_and_no_credentials_fails_before_ray(s3_server, tmp_path, audio):
    env = s3_environment(s3_server.endpoint_url, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None)
    result = ast_label(
        "run", str(audio), "--output", str(tmp_path / "out"), "--model", "s3://models/ast", env=env
    )
    assert result.returncode == 2
    assert error_lines(result.stderr) == [result.stderr.strip()]
    assert "no usable credentials" in result.stderr
    assert "Ray" not in result.stderr and not (tmp_path / "out").exists()


# --- the Ray jobs run the same commands --------------------------------------------------------


@pytest.mark.parametrize(
    "module, arguments, message",
    [
        ("jobs.label", ["{audio}", "--output", "{audio}"], "is a file, not a folder"),
        ("jobs.norm_stats", ["{tmp}/nothing.tar", "--output", "{tmp}/s.json"], "nothing.tar"),
    ],
)
def test_ray_job_modules_are_the_same_commands(tmp_path, audio, module, arguments, message):
    filled = [a.format(tmp=tmp_path, audio=audio) for a in arguments]
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", module, *filled],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    usage = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert f"Usage: python -m {module}" in usage.stdout


@pytest.mark.slow
def test_run_shows_only_its_own_lines_and_leaves_no_staging(tmp_path, tiny_hf_checkpoint):
    """Piped, as in a log: no Ray INFO lines, progress bars or core_worker errors; ast-label's
    own progress and summary; nothing left under .ast-label/staging."""
    folder = tmp_path / "audio"
    folder.mkdir()
    for index in range(6):
        (folder / f"clip-{index}.wav").write_bytes(
            encode(sine(1.0, freq=200.0 + 50 * index), 16_000, "wav")
        )
    (folder / "notes.txt").write_text("not audio")
    (folder / ".hidden.wav").write_bytes(encode(sine(1.0), 16_000, "wav"))
    output = tmp_path / "labels"
    result = subprocess.run(
        [
            str(AST_LABEL),
            "run",
            str(folder),
            "-o",
            str(output),
            "-m",
            str(tiny_hf_checkpoint),
            "--files-per-unit",
            "3",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"7 inputs: 0 labeled already, 7 new (3 work units to label) -> {output}"
    (ray_line,) = [line for line in lines if line.startswith("Ray: ")]
    assert ray_line.startswith("Ray: 2 CPUs, 0 GPUs; 1 classifier actor on CPU"), ray_line
    # A log's progress: a line every 10 s (the phase until the first rows are classified, then
    # the counts; a loaded machine may show a phase before the Ray line), and the last one.
    progress = [line for line in lines[1:] if line != ray_line]
    assert all(" | " in line or re.search(r" \.\.\. \d+s$", line) for line in progress), lines
    assert progress[-1].startswith("files 7/7 | 6 windows | 1 error | 3/3 units committed |")
    for noise in ("INFO", "WARNING", "core_worker", "Progress", "Running Dataset", "Traceback"):
        assert noise not in result.stderr, noise
    summary = result.stdout.splitlines()
    assert summary[0].startswith("done: 7 files labeled in ")
    assert summary[0].endswith(f"the output holds 7 files, 6 windows, 1 error row -> {output}")
    assert "skipped (not inputs): 1 hidden files and folders" in result.stdout
    assert any("error x1: not an audio file" in line for line in summary), summary
    assert not (output / ".ast-label" / "staging").exists()


@pytest.mark.parametrize("command", ["predict", "run"])
def test_missing_s3_credentials_for_an_input_are_exit_2_naming_the_settings(
    s3_server, tmp_path, command
):
    bucket = s3_server.create_bucket("cli-inputs")
    s3_server.filesystem().pipe_file(f"{bucket[5:]}/clip.wav", encode(sine(1.0), 16_000, "wav"))
    env = s3_environment(s3_server.endpoint_url, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None)
    output = ["--output", str(tmp_path / "out")] if command == "run" else []
    result = ast_label(command, f"{bucket}/clip.wav", *output, "--model", "default", env=env)
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert "no usable credentials" in line and "AWS_ACCESS_KEY_ID" in line
    assert "kept failing" not in line


def test_option_mistakes_are_one_line_and_help_shows_the_usage(audio):
    for arguments, message in (
        (["run", "--no-such-option"], "No such option '--no-such-option'"),
        (["run", str(audio)], "Missing option '--output'"),
        (["predict", str(audio), "--top-k", "many"], "'many' is not a valid integer"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ):
        result = CliRunner().invoke(main, arguments)
        assert result.exit_code == 2, (arguments, result.output)
        assert result.output.count("\n") == 1 and message in result.output, result.output
        assert "Usage:" not in result.output and "--help`" in result.output
    assert "run [OPTIONS] [INPUTS]..." in CliRunner().invoke(main, ["run", "--help"]).output


def test_the_bundled_demo_model_says_so_on_stderr(audio):
    result = subprocess.run(
        [str(AST_LABEL), "predict", str(audio)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "demo model of 10 synthetic classes" in result.stderr
    assert "demo model" not in result.stdout


def test_every_option_of_every_command_has_help_text():
    def options(command, path):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from options(sub, [*path, name])
        else:
            for param in command.params:
                if isinstance(param, click.Option):
                    yield " ".join(path), param

    missing = [
        f"{path} {param.opts[0]}" for path, param in options(main, ["ast-label"]) if not param.help
    ]
    assert missing == []
