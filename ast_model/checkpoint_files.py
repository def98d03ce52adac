"""Find a checkpoint's files, read them, and check every weight against the config, without torch.

Layouts read: a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin) on local
disk or any fsspec URL, a hub id (when huggingface_hub is installed and the network allows), and
the original AST repository's .pth with its class_labels_indices.csv. The weights are checked from
their headers alone (tensor_headers.py), so that the Ray driver refuses a bad model in a second and
ships the checked bytes to the workers, where checkpoint.build_model makes the module. Importing
this module, or calling it, never imports torch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import fsspec

from ast_model.config import DEFAULT_MODEL, ASTConfig
from ast_model.layouts import (
    HF_LAYOUT,
    ORIGINAL_LAYOUT,
    ORIGINAL_UNUSED_PREFIXES,
    Layout,
    expected_shapes,
    layout_names,
    state_dict_in,
)
from ast_model.tensor_headers import (
    LegacyTorchFormat,
    TensorHeader,
    safetensors_headers,
    torch_file_contents,
)

DEFAULT_MODEL_NAME = "ast-label-default"
BUNDLED_MODEL_DIR = Path(__file__).parent / "default"

HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # safetensors first: no unpickling
ORIGINAL_LABELS_CSV = "class_labels_indices.csv"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_ORIGINAL_BLOCK = re.compile(r"v\.blocks\.(\d+)\.")
_SHOW = 5  # how many offending names an error message lists
# Packages whose exceptions, whatever their type, mean that the store could not be read.
_STORAGE_CLIENT_PACKAGES = frozenset(
    {"botocore", "aiobotocore", "s3fs", "aiohttp", "fsspec", "urllib3", "requests", "gcsfs"}
)
_DENIED_CODES = ("accessdenied", "access denied", "forbidden", "invalidaccesskeyid", "signature")


class CheckpointError(Exception):
    """The model cannot be loaded: which file, what is wrong, what to do."""


@dataclass(frozen=True)
class CheckpointFiles:
    """A checkpoint read and checked: all that checkpoint.build_model needs. Picklable: the
    driver ships it to the workers through Ray's object store."""

    name: str  # the URI / hub id / DEFAULT_MODEL_NAME
    config: ASTConfig  # labels included
    weights: bytes = field(repr=False)  # the weights file's bytes, as read
    weights_file: str  # its path, for messages
    weights_sha256: str  # sha256 of weights
    layout: str  # a key of layouts.LAYOUTS: "hf" or "original"
    # The file's state dict (unwrapped, DataParallel prefix stripped): name -> dtype and shape.
    tensors: dict[str, TensorHeader] = field(repr=False)


def read_checkpoint(uri: str, *, original_config: ASTConfig | None = None) -> CheckpointFiles:
    """Finds, reads and checks a checkpoint. original_config sets what an original .pth cannot
    tell (strides, max_length, heads, labels); shapes found in the weights always win."""
    uri = str(uri)
    if uri == DEFAULT_MODEL:
        if not BUNDLED_MODEL_DIR.is_dir():
            raise CheckpointError(
                f"the bundled model is missing ({BUNDLED_MODEL_DIR}); reinstall ast-label or "
                "pass a checkpoint path or URI as the model"
            )
        return _read_location(
            *fsspec.core.url_to_fs(str(BUNDLED_MODEL_DIR)), DEFAULT_MODEL_NAME, None
        )
    if "://" not in uri and not Path(uri).expanduser().exists():
        if _HUB_ID.fullmatch(uri):
            return _read_location(*fsspec.core.url_to_fs(_download_from_hub(uri)), uri, None)
        raise CheckpointError(f"model {uri!r} not found: no such file or folder")
    try:
        fs, path = fsspec.core.url_to_fs(str(Path(uri).expanduser()) if "://" not in uri else uri)
    except (ImportError, ValueError) as error:
        raise CheckpointError(f"cannot open model {uri!r}: {error}") from error
    return _read_location(fs, path, uri, original_config)


# -- finding the files ---------------------------------------------------------------------------


def _read_location(
    fs: fsspec.AbstractFileSystem, path: str, name: str, original_config: ASTConfig | None
) -> CheckpointFiles:
    try:
        return _find_and_read(fs, path, name, original_config)
    except CheckpointError:
        raise
    except Exception as error:
        if not _is_storage_error(error):
            raise
        raise CheckpointError(f"cannot read model {name!r}: {_storage_problem(error)}") from error


def _find_and_read(
    fs: fsspec.AbstractFileSystem, path: str, name: str, original_config: ASTConfig | None
) -> CheckpointFiles:
    if path.endswith(".pth"):
        if not fs.isfile(path):
            raise CheckpointError(f"model {name!r} not found: no file {path}")
        return _read_original(fs, path, name, original_config)
    if not fs.isdir(path):
        raise CheckpointError(f"model {name!r} not found: no checkpoint folder or .pth file there")
    if fs.exists(_join(path, HF_CONFIG)):
        return _read_hf_folder(fs, path, name)
    pth_files = sorted(fs.glob(_join(path, "*.pth")))
    if len(pth_files) == 1:
        return _read_original(fs, pth_files[0], name, original_config)
    weights = [w for w in HF_WEIGHTS if fs.exists(_join(path, w))]
    what = f"has {weights[0]} but no {HF_CONFIG}" if weights else "is not a checkpoint folder"
    raise CheckpointError(
        f"{path} {what}: expected {HF_CONFIG} + {HF_WEIGHTS[0]} (or {HF_WEIGHTS[1]}), "
        f"or one original AST .pth with {ORIGINAL_LABELS_CSV}"
    )


def _is_storage_error(error: Exception) -> bool:
    """Whether reading the checkpoint failed in the store rather than in our code: OSError (what
    fsspec backends raise for most failures), or a type of the storage clients themselves
    (botocore's NoCredentialsError and EndpointConnectionError are not OSErrors)."""
    if isinstance(error, OSError | ValueError):  # ValueError: a URL fsspec cannot use
        return True
    return type(error).__module__.split(".")[0] in _STORAGE_CLIENT_PACKAGES


def _storage_problem(error: Exception) -> str:
    """One line: what the store said, then what to do. botocore's messages name the operation,
    endpoint and error code, never a credential."""
    text = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    lowered = text.lower()
    if "credential" in lowered:
        return (
            f"no usable credentials ({text}); for s3:// set AWS_PROFILE, or AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY, or run where an instance profile applies"
        )
    if "could not connect" in lowered or "connect" in type(error).__name__.lower():
        return f"cannot reach the store ({text}); check the network and AWS_ENDPOINT_URL"
    if isinstance(error, PermissionError) or any(code in lowered for code in _DENIED_CODES):
        return f"access denied ({text}); check the read permission on the model's location"
    if "nosuchbucket" in lowered:
        return f"the bucket does not exist ({text}); check the bucket name"
    return text


def _download_from_hub(repo_id: str) -> str:
    advice = (
        "download it where the network allows (huggingface-cli download) and pass the local "
        "folder or an s3:// URI of it"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} looks like a Hugging Face hub id, but huggingface_hub is not "
            f"installed; {advice}"
        ) from None
    try:
        # safetensors when the repo has it; the pickle-format weights only otherwise.
        folder = snapshot_download(repo_id, allow_patterns=[HF_CONFIG, HF_WEIGHTS[0]])
        if not (Path(folder) / HF_WEIGHTS[0]).exists():
            folder = snapshot_download(repo_id, allow_patterns=[HF_CONFIG, HF_WEIGHTS[1]])
        return folder
    except Exception as error:  # offline, unknown repo, gated, network: all end the same way
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{repo_id!r} is not a local path, and as a Hugging Face hub id it could not be "
            f"downloaded ({reason}); {advice}"
        ) from error


# -- Hugging Face folders ------------------------------------------------------------------------


def _read_hf_folder(fs: fsspec.AbstractFileSystem, root: str, name: str) -> CheckpointFiles:
    config_path = _join(root, HF_CONFIG)
    try:
        config = ASTConfig.from_hf_dict(json.loads(fs.cat_file(config_path)))
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{config_path}: not a usable AST config.json: {error}") from error
    weights_path = next((_join(root, w) for w in HF_WEIGHTS if fs.exists(_join(root, w))), None)
    if weights_path is None:
        raise CheckpointError(f"{root} has {HF_CONFIG} but neither {' nor '.join(HF_WEIGHTS)}")
    data = fs.cat_file(weights_path)
    tensors = _read_tensor_headers(data, weights_path, "hf")
    _check_fits(config, tensors, HF_LAYOUT, weights_path)
    return CheckpointFiles(
        name, config, data, weights_path, hashlib.sha256(data).hexdigest(), "hf", tensors
    )


def _read_tensor_headers(data: bytes, path: str, layout: str) -> dict[str, TensorHeader]:
    try:
        if path.endswith(".safetensors"):
            contents: Any = safetensors_headers(data)
        else:
            contents = torch_file_contents(data)
    except LegacyTorchFormat as error:
        raise CheckpointError(f"{path} was {error}") from None
    except Exception as error:  # a damaged file fails in any of the parsers' steps
        raise CheckpointError(f"{path} is damaged or not a weights file: {error}") from error
    state = state_dict_in(contents, layout)
    if not isinstance(state, dict) or not all(
        isinstance(name, str) and isinstance(tensor, TensorHeader)
        for name, tensor in state.items()
    ):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


# -- the original AST repository's .pth ----------------------------------------------------------


def _read_original(
    fs: fsspec.AbstractFileSystem, path: str, name: str, original_config: ASTConfig | None
) -> CheckpointFiles:
    data = fs.cat_file(path)
    tensors = _read_tensor_headers(data, path, "original")
    config = _infer_original_config(tensors, path, original_config)
    labels_path = _join(path.rsplit("/", 1)[0], ORIGINAL_LABELS_CSV)
    if fs.exists(labels_path):
        labels = _read_labels_csv(fs.cat_file(labels_path).decode("utf-8-sig"), labels_path)
    elif original_config is not None and original_config.num_labels == config.num_labels:
        labels = original_config.id2label
    else:
        raise CheckpointError(
            f"no {ORIGINAL_LABELS_CSV} beside {path}: put the label list (columns index,mid,"
            "display_name) there, or pass original_config with id2label"
        )
    if len(labels) != config.num_labels:
        raise CheckpointError(
            f"{labels_path} lists {len(labels)} labels but {path} has {config.num_labels} outputs"
        )
    config = replace(config, id2label=labels)
    _check_fits(config, tensors, ORIGINAL_LAYOUT, path, ORIGINAL_UNUSED_PREFIXES)
    return CheckpointFiles(
        name, config, data, path, hashlib.sha256(data).hexdigest(), "original", tensors
    )


def _infer_original_config(
    tensors: Mapping[str, TensorHeader], path: str, override: ASTConfig | None
) -> ASTConfig:
    """Sizes come from tensor shapes; what shapes cannot tell comes from override or the defaults
    of the AudioSet model (strides 10, 1024 frames, 128 mel bins, 64-wide heads)."""
    try:
        hidden = tensors["v.cls_token"].shape[-1]
        patch_size = tensors["v.patch_embed.proj.weight"].shape[-1]
        intermediate = tensors["v.blocks.0.mlp.fc1.weight"].shape[0]
        num_labels = tensors["mlp_head.1.weight"].shape[0]
        num_patches = tensors["v.pos_embed"].shape[1] - 2
    except KeyError as error:
        raise CheckpointError(
            f"{path} is not an original AST checkpoint: no {error} tensor"
        ) from None
    except IndexError:
        raise CheckpointError(f"{path} is not an original AST checkpoint: odd shapes") from None
    layers = 1 + max(int(m.group(1)) for key in tensors if (m := _ORIGINAL_BLOCK.match(key)))
    try:
        config = replace(
            override or ASTConfig(),
            num_attention_heads=override.num_attention_heads if override else max(1, hidden // 64),
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=intermediate,
            patch_size=patch_size,
            qkv_bias="v.blocks.0.attn.qkv.bias" in tensors,
            id2label=tuple(f"LABEL_{i}" for i in range(num_labels)),
        )
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}; pass original_config to describe it") from error
    if config.num_patches == num_patches:
        return config
    if override is None and (inferred := _with_patch_count(config, num_patches)) is not None:
        return inferred
    raise CheckpointError(
        f"{path} has {num_patches} position embeddings for patches, but strides "
        f"{config.frequency_stride}/{config.time_stride} over {config.max_length} frames x "
        f"{config.num_mel_bins} mel bins give {config.num_patches}; pass original_config with "
        "the frequency_stride, time_stride and max_length the model was trained with"
    )


def _with_patch_count(config: ASTConfig, num_patches: int) -> ASTConfig | None:
    """The max_length that gives num_patches time patches at the configured strides, if any."""
    frequency_patches, _ = config.patch_grid
    if num_patches % frequency_patches:
        return None
    time_patches = num_patches // frequency_patches
    shortest = (time_patches - 1) * config.time_stride + config.patch_size
    # Every length up to shortest + stride - 1 gives the same patches; the original recipes use
    # multiples of 16 (1024, 512, 128), so prefer one.
    candidates = range(shortest, shortest + config.time_stride)
    max_length = next((n for n in candidates if n % 16 == 0), shortest)
    return replace(config, max_length=max_length)


def _read_labels_csv(text: str, path: str) -> tuple[str, ...]:
    try:
        rows = {int(row["index"]): row["display_name"] for row in csv.DictReader(io.StringIO(text))}
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"{path}: expected columns index,mid,display_name ({error})"
        ) from error
    if sorted(rows) != list(range(len(rows))):
        raise CheckpointError(f"{path}: indexes must run 0..{len(rows) - 1} without gaps")
    return tuple(rows[i] for i in range(len(rows)))


# -- checking the weights against the config -----------------------------------------------------


def _check_fits(
    config: ASTConfig,
    tensors: Mapping[str, TensorHeader],
    layout: Layout,
    source: str,
    ignored_prefixes: tuple[str, ...] = (),
) -> None:
    """A CheckpointError naming every weight the config expects but the file lacks, or holds in
    another shape, and every weight of the file that the model has no place for."""
    used: set[str] = set()
    missing: list[str] = []
    wrong_shape: list[str] = []
    for key, shape in expected_shapes(config).items():
        names = layout_names(key, layout)
        part_shape = (shape[0] // len(names), *shape[1:])  # qkv: 3 names fused along dim 0
        missing += [n for n in names if n not in tensors]
        used.update(names)
        wrong_shape += [
            f"{n} {tensors[n].shape} != {part_shape}"
            for n in names
            if n in tensors and tensors[n].shape != part_shape
        ]
    unexpected = [k for k in tensors if k not in used and not k.startswith(ignored_prefixes)]
    problems = [
        f"{label} {len(items)} ({', '.join(items[:_SHOW])}{', ...' if len(items) > _SHOW else ''})"
        for label, items in (
            ("missing keys:", missing),
            ("unexpected keys:", unexpected),
            ("wrong shapes:", wrong_shape),
        )
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{source} does not fit its config (hidden {config.hidden_size}, "
            f"{config.num_hidden_layers} layers, {config.num_labels} labels): "
            + "; ".join(problems)
        )


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"
