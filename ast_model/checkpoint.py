"""Find, read, remap and verify AST weights; write them back in Hugging Face's format.

Layouts read: a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin) on local
disk or any fsspec URL, a hub id (when huggingface_hub is installed and the network allows), and
the original AST repository's .pth with its class_labels_indices.csv. Weight names of each layout
map to ours through the tables below; the modules know nothing about them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import fsspec
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from ast_model.config import DEFAULT_MODEL, ASTConfig
from ast_model.features import FbankConfig
from ast_model.model import ASTForAudioClassification

DEFAULT_MODEL_NAME = "ast-label-default"
BUNDLED_MODEL_DIR = Path(__file__).parent / "default"

HF_CONFIG = "config.json"
HF_PREPROCESSOR = "preprocessor_config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # safetensors first: no unpickling
ORIGINAL_LABELS_CSV = "class_labels_indices.csv"

# Our module name -> the layout's module name; "{i}" is a block index. Three names are fused
# along dim 0 into our qkv projection (query, key, value order, as timm's fused qkv).
Layout = Mapping[str, str | tuple[str, ...]]
_HF = "audio_spectrogram_transformer."
_HF_LAYER = _HF + "encoder.layer.{i}."
HF_LAYOUT: Layout = {
    "cls_token": _HF + "embeddings.cls_token",
    "dist_token": _HF + "embeddings.distillation_token",
    "pos_embed": _HF + "embeddings.position_embeddings",
    "patch_embed.proj": _HF + "embeddings.patch_embeddings.projection",
    "blocks.{i}.norm1": _HF_LAYER + "layernorm_before",
    "blocks.{i}.attn.qkv": tuple(
        _HF_LAYER + f"attention.attention.{part}" for part in ("query", "key", "value")
    ),
    "blocks.{i}.attn.proj": _HF_LAYER + "attention.output.dense",
    "blocks.{i}.norm2": _HF_LAYER + "layernorm_after",
    "blocks.{i}.mlp.fc1": _HF_LAYER + "intermediate.dense",
    "blocks.{i}.mlp.fc2": _HF_LAYER + "output.dense",
    "norm": _HF + "layernorm",
    "head.norm": "classifier.layernorm",
    "head.fc": "classifier.dense",
}
# github.com/YuanGongND/ast: a timm DeiT under "v." plus mlp_head = Sequential(LayerNorm, Linear),
# saved from DataParallel (the "module." prefix is stripped before this table applies).
ORIGINAL_LAYOUT: Layout = {
    "cls_token": "v.cls_token",
    "dist_token": "v.dist_token",
    "pos_embed": "v.pos_embed",
    "patch_embed.proj": "v.patch_embed.proj",
    "blocks.{i}.norm1": "v.blocks.{i}.norm1",
    "blocks.{i}.attn.qkv": "v.blocks.{i}.attn.qkv",
    "blocks.{i}.attn.proj": "v.blocks.{i}.attn.proj",
    "blocks.{i}.norm2": "v.blocks.{i}.norm2",
    "blocks.{i}.mlp.fc1": "v.blocks.{i}.mlp.fc1",
    "blocks.{i}.mlp.fc2": "v.blocks.{i}.mlp.fc2",
    "norm": "v.norm",
    "head.norm": "mlp_head.0",
    "head.fc": "mlp_head.1",
}
# DeiT's ImageNet heads stay in the original state dicts but AST never uses them.
ORIGINAL_UNUSED_PREFIXES = ("v.head.", "v.head_dist.")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_BLOCK = re.compile(r"blocks\.(\d+)\.")
_SHOW = 5  # how many offending names an error message lists
# Packages whose exceptions, whatever their type, mean that the store could not be read.
_STORAGE_CLIENT_PACKAGES = frozenset(
    {"botocore", "aiobotocore", "s3fs", "aiohttp", "fsspec", "urllib3", "requests", "gcsfs"}
)
_DENIED_CODES = ("accessdenied", "access denied", "forbidden", "invalidaccesskeyid", "signature")


class CheckpointError(Exception):
    """The model cannot be loaded: which file, what is wrong, what to do."""


@dataclass(frozen=True)
class LoadedModel:
    model: ASTForAudioClassification  # eval mode, fp32, on CPU
    config: ASTConfig
    name: str  # the URI / hub id / DEFAULT_MODEL_NAME
    weights_sha256: str  # sha256 of the weights file's bytes


def load_checkpoint(uri: str, *, original_config: ASTConfig | None = None) -> LoadedModel:
    """Loads a model for inference. original_config sets what an original .pth cannot tell
    (strides, max_length, heads, labels); shapes found in the weights always win."""
    uri = str(uri)
    if uri == DEFAULT_MODEL:
        if not BUNDLED_MODEL_DIR.is_dir():
            raise CheckpointError(
                f"the bundled model is missing ({BUNDLED_MODEL_DIR}); reinstall ast-label or "
                "pass a checkpoint path or URI as the model"
            )
        return _load_location(
            *fsspec.core.url_to_fs(str(BUNDLED_MODEL_DIR)), DEFAULT_MODEL_NAME, None
        )
    if "://" not in uri and not Path(uri).expanduser().exists():
        if _HUB_ID.fullmatch(uri):
            return _load_location(*fsspec.core.url_to_fs(_download_from_hub(uri)), uri, None)
        raise CheckpointError(f"model {uri!r} not found: no such file or folder")
    try:
        fs, path = fsspec.core.url_to_fs(str(Path(uri).expanduser()) if "://" not in uri else uri)
    except (ImportError, ValueError) as error:
        raise CheckpointError(f"cannot open model {uri!r}: {error}") from error
    return _load_location(fs, path, uri, original_config)


def save_checkpoint(
    model: ASTForAudioClassification, config: ASTConfig, directory: str | Path
) -> None:
    """Writes config.json + model.safetensors with Hugging Face's key names, and the matching
    preprocessor_config.json, so that transformers' from_pretrained and its audio-classification
    pipeline load the folder as well as load_checkpoint does."""
    state = _to_layout(model.state_dict(), HF_LAYOUT)
    weights = safetensors_save(state, metadata={"format": "pt"})
    fs, root = fsspec.core.url_to_fs(str(directory))
    fs.makedirs(root, exist_ok=True)
    for name, settings in (
        (HF_CONFIG, config.to_hf_dict()),
        (HF_PREPROCESSOR, feature_extractor_settings(config)),
    ):
        fs.pipe_file(_join(root, name), (json.dumps(settings, indent=2) + "\n").encode())
    fs.pipe_file(_join(root, HF_WEIGHTS[0]), weights)


def feature_extractor_settings(config: ASTConfig) -> dict:
    """transformers' ASTFeatureExtractor settings that compute this model's input, as
    ast_model.features does (AudioSet's mean and std)."""
    fbank = FbankConfig.for_model(config)
    return {
        "feature_extractor_type": "ASTFeatureExtractor",
        "feature_size": 1,
        "sampling_rate": fbank.sample_rate,
        "num_mel_bins": fbank.num_mel_bins,
        "max_length": fbank.max_length,
        "mean": fbank.mean,
        "std": fbank.std,
        "do_normalize": True,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }


# -- finding the files ---------------------------------------------------------------------------


def _load_location(
    fs: fsspec.AbstractFileSystem, path: str, name: str, original_config: ASTConfig | None
) -> LoadedModel:
    try:
        return _find_and_load(fs, path, name, original_config)
    except CheckpointError:
        raise
    except Exception as error:
        if not _is_storage_error(error):
            raise
        raise CheckpointError(f"cannot read model {name!r}: {_storage_problem(error)}") from error


def _find_and_load(
    fs: fsspec.AbstractFileSystem, path: str, name: str, original_config: ASTConfig | None
) -> LoadedModel:
    if path.endswith(".pth"):
        if not fs.isfile(path):
            raise CheckpointError(f"model {name!r} not found: no file {path}")
        return _load_original(fs, path, name, original_config)
    if not fs.isdir(path):
        raise CheckpointError(f"model {name!r} not found: no checkpoint folder or .pth file there")
    if fs.exists(_join(path, HF_CONFIG)):
        return _load_hf_folder(fs, path, name)
    pth_files = sorted(fs.glob(_join(path, "*.pth")))
    if len(pth_files) == 1:
        return _load_original(fs, pth_files[0], name, original_config)
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


def _load_hf_folder(fs: fsspec.AbstractFileSystem, root: str, name: str) -> LoadedModel:
    config_path = _join(root, HF_CONFIG)
    try:
        config = ASTConfig.from_hf_dict(json.loads(fs.cat_file(config_path)))
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{config_path}: not a usable AST config.json: {error}") from error
    weights_path = next((_join(root, w) for w in HF_WEIGHTS if fs.exists(_join(root, w))), None)
    if weights_path is None:
        raise CheckpointError(f"{root} has {HF_CONFIG} but neither {' nor '.join(HF_WEIGHTS)}")
    data = fs.cat_file(weights_path)
    state = _parse_weights(data, weights_path)
    model = _build(config, state, HF_LAYOUT, weights_path)
    return LoadedModel(model, config, name, hashlib.sha256(data).hexdigest())


def _parse_weights(data: bytes, path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            return safetensors_load(data)
        # weights_only refuses pickled code: a checkpoint file must not be able to run anything.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and torch raise assorted types for damaged files
        raise CheckpointError(f"{path} is damaged or not a weights file: {error}") from error
    for wrapper in ("model", "state_dict"):  # training scripts often nest the state dict
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


# -- the original AST repository's .pth ----------------------------------------------------------


def _load_original(
    fs: fsspec.AbstractFileSystem, path: str, name: str, original_config: ASTConfig | None
) -> LoadedModel:
    data = fs.cat_file(path)
    state = {key.removeprefix("module."): t for key, t in _parse_weights(data, path).items()}
    config = _infer_original_config(state, path, original_config)
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
    model = _build(config, state, ORIGINAL_LAYOUT, path, ORIGINAL_UNUSED_PREFIXES)
    return LoadedModel(model, config, name, hashlib.sha256(data).hexdigest())


def _infer_original_config(
    state: dict[str, torch.Tensor], path: str, override: ASTConfig | None
) -> ASTConfig:
    """Sizes come from tensor shapes; what shapes cannot tell comes from override or the defaults
    of the AudioSet model (strides 10, 1024 frames, 128 mel bins, 64-wide heads)."""
    try:
        hidden = state["v.cls_token"].shape[-1]
        patch_size = state["v.patch_embed.proj.weight"].shape[-1]
        intermediate = state["v.blocks.0.mlp.fc1.weight"].shape[0]
        num_labels = state["mlp_head.1.weight"].shape[0]
        num_patches = state["v.pos_embed"].shape[1] - 2
    except KeyError as error:
        raise CheckpointError(
            f"{path} is not an original AST checkpoint: no {error} tensor"
        ) from None
    layers = 1 + max(
        int(m.group(1)) for key in state if (m := _BLOCK.match(key.removeprefix("v.")))
    )
    try:
        config = replace(
            override or ASTConfig(),
            num_attention_heads=override.num_attention_heads if override else max(1, hidden // 64),
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=intermediate,
            patch_size=patch_size,
            qkv_bias="v.blocks.0.attn.qkv.bias" in state,
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


# -- remapping -----------------------------------------------------------------------------------


def _build(
    config: ASTConfig,
    state: dict[str, torch.Tensor],
    layout: Layout,
    source: str,
    ignored_prefixes: tuple[str, ...] = (),
) -> ASTForAudioClassification:
    """A model with state's weights, or a CheckpointError naming what does not fit."""
    try:
        model = ASTForAudioClassification(config)
    except ValueError as error:  # a setting the model does not implement, e.g. hidden_act
        raise CheckpointError(f"{source}: {error}") from error
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    wrong_shape: list[str] = []
    for key, target in model.state_dict().items():
        names = _layout_names(key, layout)
        part_shape = (target.shape[0] // len(names), *target.shape[1:])
        absent = [n for n in names if n not in state]
        missing += absent
        used.update(names)
        wrong_shape += [
            f"{n} {tuple(state[n].shape)} != {part_shape}"
            for n in names
            if n in state and state[n].shape != part_shape
        ]
        if not absent:
            ours[key] = torch.cat([state[n] for n in names]) if len(names) > 1 else state[names[0]]
    unexpected = [k for k in state if k not in used and not k.startswith(ignored_prefixes)]
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
    with torch.no_grad():
        model.load_state_dict(ours)  # copies into the fp32 parameters, whatever the file's dtype
    return model.float().eval()


def _to_layout(state: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        names = _layout_names(key, layout)
        for name, part in zip(names, tensor.chunk(len(names)), strict=True):
            out[name] = part.detach().float().contiguous().cpu()
    return out


def _layout_names(key: str, layout: Layout) -> tuple[str, ...]:
    """Our state-dict key -> the layout's key(s), e.g. blocks.3.attn.qkv.weight -> 3 HF names."""
    # Tokens and the position embedding are parameters of the model itself, not of a submodule.
    module, leaf = (key, "") if key in layout else key.rsplit(".", 1)
    block = _BLOCK.match(module)
    names = layout[_BLOCK.sub("blocks.{i}.", module, count=1)]
    index = block.group(1) if block else ""
    suffix = f".{leaf}" if leaf else ""
    return tuple(
        n.format(i=index) + suffix for n in ((names,) if isinstance(names, str) else names)
    )


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"
