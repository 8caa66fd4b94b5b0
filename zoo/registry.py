"""Named presets: `@register_model` functions, `create_model(name, **overrides)`, `list_models()`."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Callable, Optional

from torch import nn

from .config import TransformerConfig

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers a preset under its function's name; the function takes **overrides."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"a model named {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models(pattern: Optional[str] = None) -> list[str]:
    """Registered preset names, sorted; `pattern` filters with shell wildcards ("vit_*")."""
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def create_model(name: str, **overrides) -> nn.Module:
    """Builds preset `name`; overrides replace fields of the model's config or its backbone's.

    Raises ValueError for an unknown name (suggesting close matches) and TypeError for an
    unknown override.
    """
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (zoo.list_models() lists them)")
    return _MODELS[name](**overrides)


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def build_config(config_cls, backbone: TransformerConfig, overrides: dict, **preset):
    """A model config of `config_cls` from a preset, with flat overrides applied.

    `preset` holds the preset's own model-level values; `overrides` may name fields of
    config_cls or of TransformerConfig (applied to `backbone`), or pass a whole
    `backbone=TransformerConfig(...)`. Unknown names raise TypeError with close matches.
    """
    model_fields = _field_names(config_cls) - {"backbone"}
    backbone_fields = _field_names(TransformerConfig)
    model_values, backbone_values = dict(preset), {}
    for key, value in overrides.items():
        if key == "backbone":
            if not isinstance(value, TransformerConfig):
                raise TypeError(f"backbone must be a TransformerConfig, got {type(value).__name__}")
            backbone = value
        elif key in model_fields:
            model_values[key] = value
        elif key in backbone_fields:
            backbone_values[key] = value
        else:
            close = difflib.get_close_matches(key, sorted(model_fields | backbone_fields), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise TypeError(f"{config_cls.__name__} has no option {key!r}{hint}")
    if backbone_values:
        backbone = backbone.replace(**backbone_values)
    return config_cls(backbone=backbone, **model_values)
