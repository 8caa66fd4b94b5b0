"""tritonzoo's models: one transformer backbone, thin domain front-ends, named presets.

    model = zoo.create_model("vit_small_patch16_224", num_classes=10, attn_backend="sdpa")
    zoo.list_models("gpt*")
"""

from .attention_maps import attention_layers, attention_maps, attention_rollout
from .backbone import Block, Transformer
from .cache import KVCache
from .config import TransformerConfig
from .registry import build_config, create_model, list_models, register_model
from .weights import from_hf, from_timm

# The domain front-ends register their presets on import.
from . import seq2seq, speech, text, vision  # noqa: E402,F401  isort: skip

__all__ = [
    "attention_layers",
    "attention_maps",
    "attention_rollout",
    "Block",
    "KVCache",
    "Transformer",
    "TransformerConfig",
    "build_config",
    "from_hf",
    "from_timm",
    "create_model",
    "list_models",
    "register_model",
]
