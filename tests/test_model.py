"""Our AST == transformers' ASTForAudioClassification on the same weights; config and labels.

Tolerance: logits and pooled embeddings within 1e-4 (max abs) in fp32 on the CPU (DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_LABELS, write_hf_checkpoint

from ast_model.checkpoint import load_checkpoint
from ast_model.config import HIDDEN_ACTIVATIONS, MULTI_LABEL, SINGLE_LABEL, TINY_CONFIG, ASTConfig
from ast_model.labels import scores_from_logits, top_label_ids
from ast_model.model import ASTForAudioClassification

TOLERANCE = 1e-4

CONFIGS = {
    "tiny-strides-16": {},
    "strides-10x12-300-frames-64-mels": {
        "hidden_size": 48,
        "num_attention_heads": 3,
        "frequency_stride": 10,
        "time_stride": 12,
        "max_length": 300,
        "num_mel_bins": 64,
        "patch_size": 8,
    },
    "no-qkv-bias-tanh-gelu-200-frames": {
        "qkv_bias": False,
        "hidden_act": "gelu_new",
        "frequency_stride": 8,
        "time_stride": 6,
        "max_length": 200,
        "layer_norm_eps": 1e-6,
        "num_hidden_layers": 3,
    },
}


def write_random_hf_model(directory: Path, **overrides):
    """A transformers AST whose every parameter (tokens and positions included) is random."""
    from transformers import ASTForAudioClassification as HFModel

    write_hf_checkpoint(directory, **overrides)
    model = HFModel.from_pretrained(directory).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(directory)
    return model


def random_features(config: ASTConfig, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(batch, config.max_length, config.num_mel_bins, generator=generator)


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_logits_and_embeddings_equal_transformers(tmp_path: Path, overrides: dict):
    reference = write_random_hf_model(tmp_path, **overrides)
    loaded = load_checkpoint(str(tmp_path))
    features = random_features(loaded.config)

    with torch.no_grad():
        ours = loaded.model(features)
        expected_logits = reference(features).logits
        expected_embedding = reference.audio_spectrogram_transformer(features).pooler_output

    assert ours.logits.shape == (2, len(TINY_LABELS))
    assert ours.embedding.shape == (2, loaded.config.hidden_size)
    assert (ours.logits - expected_logits).abs().max() <= TOLERANCE
    assert (ours.embedding - expected_embedding).abs().max() <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_on_cpu_is_close_to_fp32(tiny_hf_checkpoint: Path, dtype):
    model = load_checkpoint(str(tiny_hf_checkpoint)).model
    features = random_features(model.config)
    with torch.no_grad():
        full = model(features)
        half = model.to(dtype)(features)  # the model takes fp32 features in any dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model.float()(features)

    # Outputs come back as float32 whatever the compute dtype. Loose tolerance: bf16 keeps
    # 8 mantissa bits, and logits here are O(1).
    for output in (half, autocast):
        assert output.logits.dtype == output.embedding.dtype == torch.float32
        assert (output.logits - full.logits).abs().max() <= 0.1
        assert (output.embedding - full.embedding).abs().max() <= 0.1


def test_forward_rejects_features_of_the_wrong_shape():
    model = ASTForAudioClassification(
        ASTConfig(
            hidden_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            intermediate_size=64,
            max_length=100,
            id2label=("a", "b"),
        )
    )
    with pytest.raises(ValueError, match=r"\(B, 100, 128\)"):
        model(torch.zeros(1, 1024, 128))


def test_fresh_model_trains_every_parameter():
    config = ASTConfig(
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        intermediate_size=64,
        max_length=64,
        id2label=("a", "b", "c"),
    )
    model = ASTForAudioClassification(config)
    loss = torch.nn.functional.cross_entropy(
        model(random_features(config)).logits, torch.tensor([0, 2])
    )
    loss.backward()

    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# -- config ---------------------------------------------------------------------------------------


def test_config_reads_transformers_config_json(tiny_hf_checkpoint: Path):
    config = ASTConfig.from_json_file(tiny_hf_checkpoint / "config.json")

    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert (config.frequency_stride, config.time_stride, config.max_length) == (16, 16, 1024)
    assert config.id2label == TINY_LABELS
    assert config.patch_grid == (8, 64)


def test_config_json_round_trips_through_ours_and_transformers(tmp_path: Path):
    from transformers import ASTConfig as HFConfig

    config = ASTConfig(
        hidden_size=64,
        num_attention_heads=4,
        time_stride=12,
        max_length=512,
        layer_norm_eps=1e-6,
        qkv_bias=False,
        id2label=("dog", "cat"),
        problem_type=SINGLE_LABEL,
    )
    config.to_json_file(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    hf = HFConfig.from_pretrained(tmp_path)

    assert ASTConfig.from_json_file(tmp_path / "config.json") == config
    assert written["id2label"] == {"0": "dog", "1": "cat"}  # JSON keys are strings
    assert hf.id2label == {0: "dog", 1: "cat"} and hf.problem_type == SINGLE_LABEL
    assert (hf.time_stride, hf.max_length, hf.qkv_bias, hf.layer_norm_eps) == (12, 512, False, 1e-6)
    assert ASTConfig.from_hf_dict(hf.to_dict()) == config


def test_multi_label_follows_problem_type_else_audioset_size():
    audioset = tuple(f"label {i}" for i in range(527))
    assert ASTConfig(id2label=audioset).multi_label
    assert not ASTConfig(id2label=("a", "b")).multi_label
    assert ASTConfig(id2label=("a", "b"), problem_type=MULTI_LABEL).multi_label
    assert not ASTConfig(id2label=audioset, problem_type=SINGLE_LABEL).multi_label


def test_config_rejects_impossible_settings():
    with pytest.raises(ValueError, match="multiple"):
        ASTConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="problem_type"):
        ASTConfig(problem_type="regression")
    with pytest.raises(ValueError, match="not an Audio Spectrogram"):
        ASTConfig.from_hf_dict({"model_type": "vit"})
    with pytest.raises(ValueError, match="hidden_act 'tanh' is not supported"):
        ASTConfig(hidden_act="tanh")


@pytest.mark.parametrize("activation", HIDDEN_ACTIVATIONS)
def test_every_activation_a_config_accepts_is_one_the_model_runs(activation: str):
    config = dataclasses.replace(
        TINY_CONFIG, hidden_act=activation, max_length=64, id2label=("a", "b")
    )
    logits = ASTForAudioClassification(config)(random_features(config)).logits

    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


# -- labels ---------------------------------------------------------------------------------------


def test_scores_are_sigmoid_for_multi_label_and_softmax_otherwise():
    logits = torch.tensor([[0.0, 2.0, -1.0]], dtype=torch.bfloat16)

    assert torch.allclose(scores_from_logits(logits, True), torch.sigmoid(logits.float()))
    single = scores_from_logits(logits, False)
    assert single.dtype == torch.float32 and torch.allclose(single.sum(), torch.tensor(1.0))


def test_top_label_ids_orders_best_first_and_breaks_ties_by_id():
    scores = np.array([[0.1, 0.7, 0.2, 0.7], [0.9, 0.0, 0.3, 0.1]], dtype=np.float32)
    top = top_label_ids(scores, 3)

    assert top.dtype == np.int32
    assert top.tolist() == [[1, 3, 2], [0, 2, 3]]
    assert top_label_ids(scores, 10).tolist() == [[1, 3, 2, 0], [0, 2, 3, 1]]
