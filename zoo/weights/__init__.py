"""Weight import from timm and Hugging Face: `zoo.from_timm`, `zoo.from_hf`.

Each converter maps a reference implementation's state dict onto the zoo model of the
same architecture; tests check that outputs match the source model (randomly
initialized reference models: nothing is downloaded). Pretrained weights come from
local files: `zoo.from_hf("path/to/checkpoint_dir")`.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Optional

import torch
from torch import nn

from ._common import like_source, unwrap_compiled

# Hugging Face config.model_type -> module in this package with `convert(state_dict, config, **overrides)`.
HF_CONVERTERS = {
    "bert": "hf_bert",
    "gpt2": "hf_gpt2",
    "vit": "hf_vit",
    "whisper": "hf_whisper",
}

# The transformers classes each converter reproduces: a model of another class (a head the zoo
# model does not have, e.g. BertForMultipleChoice) is refused by name, not imported as a lookalike.
HF_ARCHITECTURES = {
    "bert": ("BertModel", "BertForMaskedLM", "BertForSequenceClassification"),
    "gpt2": ("GPT2Model", "GPT2LMHeadModel"),
    "vit": ("ViTModel", "ViTForImageClassification"),
    "whisper": ("WhisperModel", "WhisperForConditionalGeneration", "WhisperEncoder"),
}


def _check_architecture(model_type: str, names: list[str], where: str) -> None:
    """Raises ValueError when none of `names` (a module's classes, or config.architectures) is supported."""
    supported = HF_ARCHITECTURES[model_type]
    if names and not any(name in supported for name in names):
        raise ValueError(f"unsupported Hugging Face {model_type} architecture {names[0]} ({where}); supported: "
                         f"{', '.join(supported)}")


def _load_local_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Weights of a local Hugging Face checkpoint folder (safetensors or PyTorch .bin, sharded or not)."""
    names = sorted(os.listdir(path))
    safetensors = [n for n in names if n.endswith(".safetensors")]
    bins = [n for n in names if n.endswith(".bin") and n.startswith("pytorch_model")]
    state: dict[str, torch.Tensor] = {}
    if safetensors:
        from safetensors.torch import load_file
        for name in safetensors:
            state.update(load_file(os.path.join(path, name)))
    elif bins:
        for name in bins:
            state.update(torch.load(os.path.join(path, name), map_location="cpu", weights_only=True))
    else:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    return state


def from_hf(source: Any, config: Optional[Any] = None, **overrides) -> nn.Module:
    """A zoo model with the weights of a Hugging Face BERT, GPT-2, ViT or Whisper (encoder).

    source: a transformers PreTrainedModel, a state dict (then `config`, a transformers
    config or its dict, is required), or a local checkpoint folder (config.json plus
    weights; nothing is downloaded). overrides go to the zoo model (e.g. attn_backend).
    A GPT-2's default stop and pad tokens come from its generation config, as transformers'
    generate() takes them: the module's `generation_config`, a folder's
    generation_config.json, else the model config.
    The model comes back in the source module's mode (training or eval), dtype and device
    (a `torch.compile`d module: the module it wraps), and in eval mode, float32 on the CPU,
    from a folder or a state dict, as `from_pretrained` gives it. Heads the zoo model does
    not have (BERT's next-sentence head, ViTModel's pooler) are left out with a warning
    naming them.
    Raises ValueError for an unsupported model type or architecture (the class, or
    config.architectures: HF_ARCHITECTURES lists what each converter reproduces) and
    FileNotFoundError for a folder without config or weights.
    """
    generation = None  # what generate() defaults to: {"eos_token_id": ..., "pad_token_id": ...}
    source = unwrap_compiled(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in {path}")
        with open(config_path) as f:
            config = json.load(f)
        generation_path = os.path.join(path, "generation_config.json")
        if os.path.isfile(generation_path):
            with open(generation_path) as f:
                generation = json.load(f)
        state_dict = _load_local_state_dict(path)
    elif isinstance(source, nn.Module):
        state_dict, config = source.state_dict(), source.config
        if getattr(source, "generation_config", None) is not None:
            generation = source.generation_config.to_dict()
    elif isinstance(source, dict):
        if config is None:
            raise ValueError("from_hf(state_dict) needs config= (the transformers config or its dict)")
        state_dict = source
    else:
        raise TypeError(f"from_hf takes a transformers model, a state dict or a folder, got {type(source).__name__}")
    if isinstance(config, dict):
        import transformers
        model_type = config.get("model_type")
        if model_type not in HF_CONVERTERS:
            raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; supported: "
                             f"{', '.join(HF_CONVERTERS)}")
        config = transformers.AutoConfig.for_model(**config)
    model_type = getattr(config, "model_type", None)
    if model_type not in HF_CONVERTERS:
        raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; supported: {', '.join(HF_CONVERTERS)}")
    if isinstance(source, nn.Module):
        _check_architecture(model_type, [c.__name__ for c in type(source).__mro__], "the model's class")
    else:
        _check_architecture(model_type, list(getattr(config, "architectures", None) or []), "config.architectures")
    module = importlib.import_module(f"{__name__}.{HF_CONVERTERS[model_type]}")
    if model_type == "gpt2":
        model = module.convert(state_dict, config, generation=generation, **overrides)
    else:
        model = module.convert(state_dict, config, **overrides)
    return like_source(model.train(source.training if isinstance(source, nn.Module) else False), source)


def from_timm(source: Any, **overrides) -> nn.Module:
    """A zoo ViT with the weights of a timm VisionTransformer (model, or state dict + overrides).

    source: a timm VisionTransformer, or its state dict (the architecture is read from
    the tensor shapes; pass e.g. num_heads= which shapes cannot tell). From a module, the
    model has its mode, dtype and device. Raises ValueError for an unsupported timm
    architecture.
    """
    from . import timm_vit
    return timm_vit.convert(source, **overrides)
