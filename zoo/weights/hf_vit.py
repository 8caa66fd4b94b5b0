"""Hugging Face ViT (ViTModel / ViTForImageClassification) -> zoo VisionTransformer.

Accepts both key layouts: transformers 5's (`vit.layers.N.attention.q_proj`, `mlp.fc1`)
and the one of checkpoints saved before it (`vit.encoder.layer.N.attention.attention.query`,
`intermediate.dense`, ...). Separate query/key/value projections are concatenated into
the zoo's fused [q | k | v] projection.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ..config import TransformerConfig
from ..registry import build_config
from ..vision import ViTConfig, VisionTransformer
from ._common import load_exactly, warn_dropped

# Hugging Face hidden_act -> zoo MLP type. gelu_new is the tanh approximation written out.
_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu"}

# Pre-transformers-5 names -> current names, applied in order (attention.output.dense before output.dense).
_LEGACY = [
    (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]

_LAYER_PARTS = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.o_proj": "attn.proj",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
        "layernorm.weight": "backbone.norm.weight", "layernorm.bias": "backbone.norm.bias",
        "classifier.weight": "head.weight", "classifier.bias": "head.bias"}


def _canonical(key: str) -> str:
    """A key without the `vit.` prefix, in transformers 5's names."""
    key = key[len("vit."):] if key.startswith("vit.") else key
    for pattern, replacement in _LEGACY:
        key = re.sub(pattern, replacement, key)
    return key


def rename_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ViT weights under the zoo ViT's names, q/k/v fused into one projection.

    Raises ValueError for weights the zoo ViT has no place for (a masked-image-modeling
    mask token or decoder, ...); ViTModel's pooler is left out with a warning.
    """
    state = {_canonical(k): v for k, v in state_dict.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    pooler: list[str] = []
    for key, value in state.items():
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m and m.group(2) in _LAYER_PARTS:
            out[f"backbone.blocks.{m.group(1)}.{_LAYER_PARTS[m.group(2)]}.{m.group(3)}"] = value
        elif m and m.group(2) in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)[-6]] = value
        elif key.startswith("pooler."):  # ViTModel's pooled output: the zoo ViT has features and a head
            pooler.append(key)
        else:
            raise ValueError(f"Hugging Face ViT weight {key!r} has no counterpart in the zoo VisionTransformer")
    for (layer, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            plural = "biases" if kind == "bias" else "weights"
            raise ValueError(f"layer {layer} has {plural} for {sorted(parts)} of the q/k/v projections, not all three")
        out[f"backbone.blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if pooler:
        warn_dropped("Hugging Face ViT", "ViTModel's pooler", pooler)
    return out


def config_from_hf(config, num_classes: int) -> tuple[TransformerConfig, dict]:
    """The zoo backbone config and ViT fields of a transformers ViTConfig.

    Raises ValueError for an activation the zoo MLP does not have.
    """
    act = config.hidden_act
    if act not in _ACTIVATIONS:
        raise ValueError(f"Hugging Face ViT hidden_act {act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    head_dim = getattr(config, "head_dim", None)
    backbone = TransformerConfig(
        dim=config.hidden_size, depth=config.num_hidden_layers, heads=config.num_attention_heads,
        head_dim=None if head_dim is None or head_dim * config.num_attention_heads == config.hidden_size else head_dim,
        mlp=_ACTIVATIONS[act], mlp_hidden=config.intermediate_size, norm="layernorm", norm_eps=config.layer_norm_eps,
        prenorm=True, final_norm=True, positions="none", qkv_bias=config.qkv_bias,
        dropout=config.hidden_dropout_prob, attn_dropout=config.attention_probs_dropout_prob,
    )

    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)

    fields = dict(img_size=pair(config.image_size), patch_size=pair(config.patch_size), in_chans=config.num_channels,
                  num_classes=num_classes, global_pool="token", class_token=True,
                  pos_antialias=False)  # other image sizes: as interpolate_pos_encoding=True
    return backbone, fields


def convert(state_dict: dict[str, Tensor], config, **overrides) -> VisionTransformer:
    """A zoo VisionTransformer with the weights of a Hugging Face ViT state dict.

    config: its transformers ViTConfig. The head comes from `classifier` when present
    (ViTForImageClassification), else the model has none (ViTModel; its pooler is left out).
    overrides go to the zoo config (e.g. attn_backend="sdpa"). Returns the model in eval
    mode. Raises ValueError for unsupported weights or activations, and when a tensor
    would be dropped or left unset.
    """
    state = rename_state_dict(state_dict)
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    backbone, fields = config_from_hf(config, num_classes)
    model = VisionTransformer(build_config(ViTConfig, backbone, overrides, **fields))
    return load_exactly(model, state, "Hugging Face ViT").eval()
