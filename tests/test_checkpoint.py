"""read_checkpoint / build_model / load_checkpoint / save_checkpoint: every supported layout, and
every way a checkpoint goes wrong, found by read_checkpoint without torch.

Numbers are compared with transformers' ASTForAudioClassification (max abs 1e-4, fp32, CPU).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_LABELS, write_hf_checkpoint
from safetensors.torch import load_file, save_file

import ast_model.checkpoint_files as checkpoint_files
from ast_model.checkpoint import build_model, load_checkpoint, save_checkpoint
from ast_model.checkpoint_files import CheckpointError, read_checkpoint
from ast_model.config import DEFAULT_MODEL, TINY_CONFIG, ASTConfig, FbankConfig
from ast_model.features import compute_fbank
from ast_model.layouts import expected_shapes
from ast_model.model import ASTForAudioClassification

TOLERANCE = 1e-4


def hf_logits(directory: Path, features: torch.Tensor) -> torch.Tensor:
    from transformers import ASTForAudioClassification as HFModel

    with torch.no_grad():
        return HFModel.from_pretrained(directory).eval()(features).logits


def features_for(config: ASTConfig) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, config.max_length, config.num_mel_bins, generator=generator)


def logits_of(model, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(features).logits


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def write_bin_checkpoint(source: Path, target: Path, wrap=lambda state: state) -> Path:
    """The source folder with its safetensors turned into a torch.save pytorch_model.bin."""
    folder = copy_checkpoint(source, target)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(wrap(state), folder / "pytorch_model.bin")
    return folder


# -- Hugging Face folders -------------------------------------------------------------------------


def test_hf_folder_loads_in_eval_mode_on_cpu_with_the_weights_sha256(tiny_hf_checkpoint: Path):
    loaded = load_checkpoint(str(tiny_hf_checkpoint))
    features = features_for(loaded.config)

    weights = (tiny_hf_checkpoint / "model.safetensors").read_bytes()
    assert loaded.weights_sha256 == hashlib.sha256(weights).hexdigest()
    assert loaded.name == str(tiny_hf_checkpoint)
    assert loaded.config.id2label == TINY_LABELS
    assert not loaded.model.training
    assert {(p.dtype, p.device.type) for p in loaded.model.parameters()} == {(torch.float32, "cpu")}
    assert (
        logits_of(loaded.model, features) - hf_logits(tiny_hf_checkpoint, features)
    ).abs().max() <= TOLERANCE


def test_pytorch_model_bin_loads_when_there_is_no_safetensors(
    tiny_hf_checkpoint: Path, tmp_path: Path
):
    folder = write_bin_checkpoint(tiny_hf_checkpoint, tmp_path / "bin")

    loaded = load_checkpoint(str(folder))
    features = features_for(loaded.config)
    expected = logits_of(load_checkpoint(str(tiny_hf_checkpoint)).model, features)
    assert torch.equal(logits_of(loaded.model, features), expected)
    assert (
        loaded.weights_sha256
        == hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()
    )


def test_save_checkpoint_is_loaded_by_transformers_and_by_us(
    tiny_hf_checkpoint: Path, tmp_path: Path
):
    original = load_checkpoint(str(tiny_hf_checkpoint))
    save_checkpoint(original.model, original.config, tmp_path / "saved")
    features = features_for(original.config)

    expected = logits_of(original.model, features)
    assert (hf_logits(tmp_path / "saved", features) - expected).abs().max() <= TOLERANCE
    assert torch.equal(
        logits_of(load_checkpoint(str(tmp_path / "saved")).model, features), expected
    )
    assert (
        load_file(tmp_path / "saved" / "model.safetensors").keys()
        == load_file(tiny_hf_checkpoint / "model.safetensors").keys()
    )


def test_saved_checkpoint_carries_the_feature_extractor_that_computes_our_features(
    tiny_hf_checkpoint: Path, tmp_path: Path
):
    """transformers' pipelines need preprocessor_config.json; it must describe our fbank."""
    from transformers import ASTFeatureExtractor

    original = load_checkpoint(str(tiny_hf_checkpoint))
    save_checkpoint(original.model, original.config, tmp_path / "saved")
    extractor = ASTFeatureExtractor.from_pretrained(tmp_path / "saved")
    clip = np.sin(np.arange(16_000 * 3) / 16_000 * 2 * np.pi * 440).astype(np.float32)
    theirs = extractor(clip, sampling_rate=16_000, return_tensors="pt")["input_values"]
    ours = compute_fbank(
        torch.from_numpy(clip)[None],
        torch.tensor([len(clip)]),
        FbankConfig.for_model(original.config),
    )
    assert (theirs - ours).abs().max() <= 1e-4


def test_checkpoint_loads_from_s3(s3_server, tiny_hf_checkpoint: Path):
    bucket = s3_server.create_bucket("ast-models")
    s3_server.filesystem().put(str(tiny_hf_checkpoint), "ast-models/tiny", recursive=True)

    remote = load_checkpoint(f"{bucket}/tiny")
    local = load_checkpoint(str(tiny_hf_checkpoint))
    features = features_for(local.config)
    assert remote.name == "s3://ast-models/tiny"
    assert remote.weights_sha256 == local.weights_sha256
    assert torch.equal(logits_of(remote.model, features), logits_of(local.model, features))


# -- the original AST repository's .pth -----------------------------------------------------------


def to_original_layout(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> github.com/YuanGongND/ast names (DataParallel, timm DeiT under "v.")."""
    prefix = "audio_spectrogram_transformer."
    renames = {
        "embeddings.cls_token": "v.cls_token",
        "embeddings.distillation_token": "v.dist_token",
        "embeddings.position_embeddings": "v.pos_embed",
        "embeddings.patch_embeddings.projection": "v.patch_embed.proj",
        "layernorm_before": "norm1",
        "attention.output.dense": "attn.proj",
        "layernorm_after": "norm2",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
        "encoder.layer.": "v.blocks.",
        "classifier.layernorm": "mlp_head.0",
        "classifier.dense": "mlp_head.1",
    }
    original: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        if ".attention.attention." in key:
            if ".query." not in key:
                continue
            fused = torch.cat(
                [hf_state[key.replace("query", part)] for part in ("query", "key", "value")]
            )
            key, tensor = key.replace("attention.attention.query", "attn.qkv"), fused
        key = key.removeprefix(prefix)
        for old, new in renames.items():
            key = key.replace(old, new)
        key = "v.norm." + key.removeprefix("layernorm.") if key.startswith("layernorm.") else key
        original["module." + key] = tensor
    # DeiT's ImageNet heads ride along in the real files.
    width = hf_state[prefix + "embeddings.cls_token"].shape[-1]
    original["module.v.head.weight"] = torch.zeros(1000, width)
    original["module.v.head_dist.weight"] = torch.zeros(1000, width)
    return original


def write_original_checkpoint(hf_folder: Path, target: Path, labels=TINY_LABELS) -> Path:
    target.mkdir(parents=True)
    state = to_original_layout(load_file(hf_folder / "model.safetensors"))
    torch.save({"model": state, "epoch": torch.tensor(30)}, target / "audio_model.pth")
    with open(target / "class_labels_indices.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "mid", "display_name"])
        writer.writerows([i, f"/m/{i:04d}", name] for i, name in enumerate(labels))
    return target / "audio_model.pth"


def test_original_pth_with_labels_csv_matches_transformers(tmp_path: Path):
    # hidden 128 -> 2 heads of 64, as the original recipe infers; strides 10 over 1024 frames.
    labels = ("Speech", "Male speech, man speaking", "Dog")
    hf_folder = write_hf_checkpoint(
        tmp_path / "hf",
        labels=labels,
        hidden_size=128,
        num_hidden_layers=1,
        frequency_stride=10,
        time_stride=10,
    )
    pth = write_original_checkpoint(hf_folder, tmp_path / "original", labels)

    loaded = load_checkpoint(str(pth))
    features = features_for(loaded.config)
    assert loaded.config.id2label == labels
    assert (loaded.config.num_attention_heads, loaded.config.max_length) == (2, 1024)
    assert loaded.weights_sha256 == hashlib.sha256(pth.read_bytes()).hexdigest()
    assert (
        logits_of(loaded.model, features) - hf_logits(hf_folder, features)
    ).abs().max() <= TOLERANCE
    # The folder alone finds the one .pth in it.
    assert torch.equal(
        logits_of(load_checkpoint(str(pth.parent)).model, features),
        logits_of(loaded.model, features),
    )


def test_original_pth_infers_max_length_from_position_embeddings(tmp_path: Path):
    hf_folder = write_hf_checkpoint(
        tmp_path / "hf",
        hidden_size=64,
        num_hidden_layers=1,
        frequency_stride=10,
        time_stride=10,
        max_length=512,
    )
    loaded = load_checkpoint(str(write_original_checkpoint(hf_folder, tmp_path / "original")))

    features = features_for(loaded.config)
    assert loaded.config.max_length == 512
    assert (
        logits_of(loaded.model, features) - hf_logits(hf_folder, features)
    ).abs().max() <= TOLERANCE


def test_original_pth_takes_strides_and_heads_from_original_config(
    tiny_hf_checkpoint: Path, tmp_path: Path
):
    pth = write_original_checkpoint(tiny_hf_checkpoint, tmp_path / "original")
    with pytest.raises(CheckpointError, match="pass original_config"):
        load_checkpoint(str(pth))  # strides 16 cannot be told from 8 x 64 patches

    settings = ASTConfig(num_attention_heads=2, frequency_stride=16, time_stride=16)
    loaded = load_checkpoint(str(pth), original_config=settings)
    features = features_for(loaded.config)
    assert (
        logits_of(loaded.model, features) - hf_logits(tiny_hf_checkpoint, features)
    ).abs().max() <= TOLERANCE


def test_original_pth_without_labels_csv_says_what_to_add(tiny_hf_checkpoint: Path, tmp_path: Path):
    pth = write_original_checkpoint(tiny_hf_checkpoint, tmp_path / "original")
    (pth.parent / "class_labels_indices.csv").unlink()

    with pytest.raises(
        CheckpointError, match="no class_labels_indices.csv beside .*audio_model.pth"
    ):
        load_checkpoint(
            str(pth),
            original_config=ASTConfig(num_attention_heads=2, frequency_stride=16, time_stride=16),
        )


# -- read_checkpoint: every check from the files' headers, without torch --------------------------


@pytest.fixture(scope="module")
def checkpoints(tiny_hf_checkpoint: Path, tmp_path_factory) -> dict[str, str]:
    """One checkpoint of each format that read_checkpoint reads, by format."""
    root = tmp_path_factory.mktemp("formats")
    # The original recipe's hidden 128 -> 2 heads and strides 10: read without original_config.
    hf_128 = write_hf_checkpoint(
        root / "hf-128", hidden_size=128, num_hidden_layers=1, frequency_stride=10, time_stride=10
    )
    return {
        "hf-safetensors": str(tiny_hf_checkpoint),
        "hf-bin": str(write_bin_checkpoint(tiny_hf_checkpoint, root / "bin")),
        "original-pth": str(write_original_checkpoint(hf_128, root / "original")),
        "bundled-default": DEFAULT_MODEL,
    }


@pytest.mark.parametrize("form", ["hf-safetensors", "hf-bin", "original-pth", "bundled-default"])
def test_read_checkpoint_then_build_model_is_load_checkpoint(checkpoints: dict, form: str):
    files = read_checkpoint(checkpoints[form])
    built = build_model(files)
    loaded = load_checkpoint(checkpoints[form])

    assert (files.name, files.config, files.weights_sha256) == (
        loaded.name,
        loaded.config,
        loaded.weights_sha256,
    )
    assert files.weights_sha256 == hashlib.sha256(Path(files.weights_file).read_bytes()).hexdigest()
    assert (built.name, built.config, built.weights_sha256) == (
        loaded.name,
        loaded.config,
        loaded.weights_sha256,
    )
    features = features_for(loaded.config)
    assert torch.equal(logits_of(built.model, features), logits_of(loaded.model, features))


def test_reading_every_format_never_imports_torch(checkpoints: dict):
    script = (
        "import json, sys\n"
        "from ast_model.checkpoint_files import read_checkpoint\n"
        "digests = [read_checkpoint(uri).weights_sha256 for uri in sys.argv[1:]]\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'digests': digests}))\n"
    )
    uris = list(checkpoints.values())
    result = subprocess.run(
        [sys.executable, "-c", script, *uris],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    report = json.loads(result.stdout)

    assert report["torch"] is False
    assert report["digests"] == [load_checkpoint(uri).weights_sha256 for uri in uris]


def test_checkpoint_files_survive_pickling(tiny_hf_checkpoint: Path):
    """The driver ships CheckpointFiles to the workers through Ray's object store."""
    files = read_checkpoint(str(tiny_hf_checkpoint))
    copy = pickle.loads(pickle.dumps(files))

    assert copy == files
    assert "weights=" not in repr(files)  # megabytes of bytes never reach a log
    features = features_for(files.config)
    assert torch.equal(
        logits_of(build_model(copy).model, features), logits_of(build_model(files).model, features)
    )


def test_bin_nested_in_a_training_checkpoint_reads_bfloat16_and_parameters(
    tiny_hf_checkpoint: Path, tmp_path: Path
):
    def training_checkpoint(state: dict) -> dict:
        weights = {k: torch.nn.Parameter(t.bfloat16(), False) for k, t in state.items()}
        return {"state_dict": weights, "step": 1200, "run": "tiny", "lr": [0.1, 0.01]}

    folder = write_bin_checkpoint(tiny_hf_checkpoint, tmp_path / "nested", training_checkpoint)
    files = read_checkpoint(str(folder))

    stored = torch.load(folder / "pytorch_model.bin", weights_only=True)["state_dict"]
    assert files.tensors == {k: ("bfloat16", tuple(t.shape)) for k, t in stored.items()}
    features = features_for(files.config)
    reference = ASTForAudioClassification(files.config).eval()
    reference.load_state_dict(load_checkpoint(str(tiny_hf_checkpoint)).model.state_dict())
    reference = reference.bfloat16().float()  # the same weights, rounded as the file holds them
    built = build_model(files).model
    assert torch.equal(logits_of(built, features), logits_of(reference, features))


SHAPE_CONFIGS = {
    "tiny": dataclasses.replace(TINY_CONFIG, id2label=("a", "b")),
    "base-audioset": ASTConfig(id2label=tuple(f"label {i}" for i in range(527))),
    "no-qkv-bias-strides-10x12": ASTConfig(
        hidden_size=48,
        num_attention_heads=3,
        num_hidden_layers=3,
        qkv_bias=False,
        frequency_stride=10,
        time_stride=12,
        max_length=300,
        num_mel_bins=64,
        patch_size=8,
        id2label=("a",),
    ),
}


@pytest.mark.parametrize("config", SHAPE_CONFIGS.values(), ids=SHAPE_CONFIGS.keys())
def test_expected_shapes_are_the_models_state_dict(config: ASTConfig):
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = ASTForAudioClassification(config)

    expected = [(key, tuple(t.shape)) for key, t in model.state_dict().items()]
    assert list(expected_shapes(config).items()) == expected


# -- what goes wrong ------------------------------------------------------------------------------


def test_corrupt_safetensors_names_the_file(tiny_hf_checkpoint: Path, tmp_path: Path):
    folder = copy_checkpoint(tiny_hf_checkpoint, tmp_path / "corrupt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged"):
        read_checkpoint(str(folder))


def test_pickled_objects_in_a_bin_file_are_refused(tiny_hf_checkpoint: Path, tmp_path: Path):
    folder = copy_checkpoint(tiny_hf_checkpoint, tmp_path / "pickle")
    (folder / "model.safetensors").unlink()
    torch.save({"payload": Path("/etc/passwd")}, folder / "pytorch_model.bin")

    with pytest.raises(
        CheckpointError,
        match=r"pytorch_model\.bin is damaged or not a weights file: .*refuses to unpickle "
        r"pathlib\.PosixPath",
    ):
        read_checkpoint(str(folder))


class RunsACommand:
    """What a malicious checkpoint pickles: unpickling it calls os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pickled_code_is_refused_and_never_runs(tiny_hf_checkpoint: Path, tmp_path: Path):
    marker = tmp_path / "pwned"
    folder = write_bin_checkpoint(
        tiny_hf_checkpoint,
        tmp_path / "code",
        lambda state: {**state, "payload": RunsACommand(f"touch {marker}")},
    )

    with pytest.raises(CheckpointError, match=r"refuses to unpickle (posix|os)\.system"):
        read_checkpoint(str(folder))
    with pytest.raises(CheckpointError, match="damaged or not a weights file"):
        load_checkpoint(str(folder))
    assert not marker.exists()


def test_bin_without_tensors_is_not_a_state_dict(tiny_hf_checkpoint: Path, tmp_path: Path):
    folder = write_bin_checkpoint(
        tiny_hf_checkpoint, tmp_path / "lists", lambda state: {k: [1.0, 2.0] for k in state}
    )

    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin does not hold a state dict"):
        read_checkpoint(str(folder))


def test_legacy_torch_format_says_how_to_convert(tiny_hf_checkpoint: Path, tmp_path: Path):
    folder = copy_checkpoint(tiny_hf_checkpoint, tmp_path / "legacy")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)

    with pytest.raises(
        CheckpointError, match=r"pytorch_model\.bin was written by torch < 1\.6.*re-save it"
    ):
        read_checkpoint(str(folder))


def test_bin_whose_storage_record_is_cut_names_the_record(
    tiny_hf_checkpoint: Path, tmp_path: Path
):
    folder = write_bin_checkpoint(tiny_hf_checkpoint, tmp_path / "cut")
    weights = folder / "pytorch_model.bin"
    with zipfile.ZipFile(weights) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    record = next(name for name in records if name.endswith("/data/0"))
    records[record] = records[record][:-4]
    with zipfile.ZipFile(weights, "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data)

    with pytest.raises(CheckpointError, match=rf"damaged .*storage record {record} has"):
        read_checkpoint(str(folder))


def test_truncated_bin_names_the_file(tiny_hf_checkpoint: Path, tmp_path: Path):
    folder = write_bin_checkpoint(tiny_hf_checkpoint, tmp_path / "truncated")
    weights = folder / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:-5000])

    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is damaged"):
        read_checkpoint(str(folder))


def test_body_that_its_header_misdescribes_fails_in_build_model(tiny_hf_checkpoint: Path):
    files = read_checkpoint(str(tiny_hf_checkpoint))
    damaged = dataclasses.replace(files, weights=files.weights[:-64])

    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged"):
        build_model(damaged)


def test_missing_and_unexpected_keys_are_named(tiny_hf_checkpoint: Path, tmp_path: Path):
    folder = copy_checkpoint(tiny_hf_checkpoint, tmp_path / "keys")
    state = load_file(folder / "model.safetensors")
    state["extra.weight"] = state.pop("classifier.dense.weight")
    save_file(state, folder / "model.safetensors")

    with pytest.raises(CheckpointError) as error:
        read_checkpoint(str(folder))
    assert "missing keys: 1 (classifier.dense.weight)" in str(error.value)
    assert "unexpected keys: 1 (extra.weight)" in str(error.value)


def test_weights_that_do_not_fit_config_json_name_the_shapes(
    tiny_hf_checkpoint: Path, tmp_path: Path
):
    folder = copy_checkpoint(tiny_hf_checkpoint, tmp_path / "shapes")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(
        CheckpointError,
        match=r"wrong shapes: 6 \(.*intermediate\.dense\.weight \(64, 32\) != \(128, 32\)",
    ):
        read_checkpoint(str(folder))


def test_missing_config_json_is_reported(tiny_hf_checkpoint: Path, tmp_path: Path):
    folder = copy_checkpoint(tiny_hf_checkpoint, tmp_path / "no-config")
    (folder / "config.json").unlink()

    with pytest.raises(CheckpointError, match="has model.safetensors but no config.json"):
        read_checkpoint(str(folder))


def test_unreadable_config_json_names_the_file(tiny_hf_checkpoint: Path, tmp_path: Path):
    folder = copy_checkpoint(tiny_hf_checkpoint, tmp_path / "bad-config")
    (folder / "config.json").write_text("{not json")

    with pytest.raises(CheckpointError, match=r"config\.json: not a usable AST config"):
        read_checkpoint(str(folder))


def test_missing_path_and_unreachable_hub_id_say_what_to_do(tmp_path: Path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(str(tmp_path / "nothing-here"))
    # Tests run with HF_HUB_OFFLINE=1, as a cluster without internet would.
    with pytest.raises(CheckpointError, match="pass the local folder or an s3:// URI"):
        read_checkpoint("MIT/ast-finetuned-audioset-10-10-0.4593")


def test_missing_bundled_model_is_reported(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(checkpoint_files, "BUNDLED_MODEL_DIR", tmp_path / "default")

    with pytest.raises(CheckpointError, match="bundled model is missing"):
        read_checkpoint(DEFAULT_MODEL)
