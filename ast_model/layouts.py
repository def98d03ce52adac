"""Weight names and shapes: ours, what a config implies, and how each file layout names them.

Pure data and string logic, free of torch: checkpoint_files checks a file's tensors against
expected_shapes without loading them, and checkpoint remaps the loaded tensors through the same
tables. The modules in model.py know nothing about any of this.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ast_model.config import ASTConfig

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
DATA_PARALLEL_PREFIX = "module."
LAYOUTS: Mapping[str, Layout] = {"hf": HF_LAYOUT, "original": ORIGINAL_LAYOUT}

_BLOCK = re.compile(r"blocks\.(\d+)\.")


def expected_shapes(config: ASTConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict key -> shape, in ASTForAudioClassification(config).state_dict()'s order."""
    width, inner = config.hidden_size, config.intermediate_size

    def linear(name: str, outputs: int, inputs: int, bias: bool = True) -> dict:
        weight = {f"{name}.weight": (outputs, inputs)}
        return weight | {f"{name}.bias": (outputs,)} if bias else weight

    def norm(name: str) -> dict:
        return {f"{name}.weight": (width,), f"{name}.bias": (width,)}

    shapes = {
        "cls_token": (1, 1, width),
        "dist_token": (1, 1, width),
        "pos_embed": (1, 2 + config.num_patches, width),
        "patch_embed.proj.weight": (width, 1, config.patch_size, config.patch_size),
        "patch_embed.proj.bias": (width,),
    }
    for i in range(config.num_hidden_layers):
        block = f"blocks.{i}"
        shapes |= norm(f"{block}.norm1")
        shapes |= linear(f"{block}.attn.qkv", 3 * width, width, bias=config.qkv_bias)
        shapes |= linear(f"{block}.attn.proj", width, width)
        shapes |= norm(f"{block}.norm2")
        shapes |= linear(f"{block}.mlp.fc1", inner, width)
        shapes |= linear(f"{block}.mlp.fc2", width, inner)
    return shapes | norm("norm") | norm("head.norm") | linear("head.fc", config.num_labels, width)


def layout_names(key: str, layout: Layout) -> tuple[str, ...]:
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


def state_dict_in(contents: Any, layout: str) -> Any:
    """The state dict inside what a weights file holds, keyed as the layout's table expects."""
    for wrapper in ("model", "state_dict"):  # training scripts often nest the state dict
        if isinstance(contents, dict) and isinstance(contents.get(wrapper), dict):
            contents = contents[wrapper]
    if layout == "original" and isinstance(contents, dict):
        contents = {
            k.removeprefix(DATA_PARALLEL_PREFIX) if isinstance(k, str) else k: v
            for k, v in contents.items()
        }
    return contents

