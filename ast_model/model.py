"""The Audio Spectrogram Transformer: a DeiT-style ViT over fbank patches, with a classifier head.

Numerically the same as transformers' ASTForAudioClassification; parameter names are our own
(timm-like). The mapping from other layouts lives in layouts.py, never here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ast_model.config import ASTConfig

# transformers' default initializer_range; only matters for models trained from scratch.
INIT_STD = 0.02

# The dtypes that autocast casts to its own (it leaves float64 alone).
_AUTOCAST_INPUTS = (torch.float32, torch.float16, torch.bfloat16)

# Keyed by config.HIDDEN_ACTIVATIONS, which ASTConfig checks.
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,  # exact (erf) GELU, as transformers' "gelu"
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


@dataclass
class ASTOutput:
    logits: torch.Tensor  # (B, num_labels) float32
    embedding: (
        torch.Tensor
    )  # (B, D) float32: mean of the CLS and distillation tokens after the final norm


class PatchEmbedding(nn.Module):
    """Overlapping 16x16 patches of the (frequency, time) image, one D-vector each."""

    def __init__(self, config: ASTConfig):
        super().__init__()
        self.proj = nn.Conv2d(
            1,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=(config.frequency_stride, config.time_stride),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Frequency is the image's height and time its width (original AST and transformers).
        image = features.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        patches = self.proj(image)  # (B, D, F', T')
        return patches.flatten(2).transpose(1, 2)  # (B, P, D), frequency-major


class SelfAttention(nn.Module):
    def __init__(self, config: ASTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape  # (B, L, D)
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D/H)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D/H)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, config: ASTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: ASTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClassifierHead(nn.Module):
    def __init__(self, config: ASTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(pooled))  # (B, num_labels)


class ASTForAudioClassification(nn.Module):
    def __init__(self, config: ASTConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.patch_embed = PatchEmbedding(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + config.num_patches, width))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.head = ClassifierHead(config)
        self.apply(_init_weights)
        for token in (self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(token, std=INIT_STD)

    def forward(self, features: torch.Tensor) -> ASTOutput:
        expected = (self.config.max_length, self.config.num_mel_bins)
        if features.ndim != 3 or tuple(features.shape[1:]) != expected:
            raise ValueError(
                f"features must be (B, {expected[0]}, {expected[1]}), got {tuple(features.shape)}"
            )
        # A model cast to bf16/fp16 takes fp32 features, an fp32 model narrower ones. Under
        # autocast the convolution casts its input to the autocast dtype itself: casting to the
        # weights' dtype first would only add a copy (bf16 -> fp32 -> bf16, the same numbers).
        if not (
            torch.is_autocast_enabled(features.device.type) and features.dtype in _AUTOCAST_INPUTS
        ):
            features = features.to(self.patch_embed.proj.weight.dtype)  # (B, T, F)
        patches = self.patch_embed(features)  # (B, P, D)
        batch = patches.shape[0]
        tokens = torch.cat(
            (self.cls_token.expand(batch, -1, -1), self.dist_token.expand(batch, -1, -1), patches),
            dim=1,
        )  # (B, 2 + P, D)
        x = tokens + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        embedding = (x[:, 0] + x[:, 1]) / 2  # (B, D)
        logits = self.head(embedding)
        # float32 out whatever the compute dtype: callers go straight to numpy, which has no bf16.
        return ASTOutput(logits=logits.float(), embedding=embedding.float())


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
