"""Attention you can look at: the probabilities the fast kernels never store.

    maps = zoo.attention_maps(model, {"input_ids": ids, "attention_mask": mask}, layers=[0, -1], heads=[0])
    maps["backbone.blocks.0.attn"]            # (B, 1, Sq, Sk) float32, rows sum to 1
    rollout = zoo.attention_rollout([maps[k] for k in sorted_self_attention_names])

The chosen attention layers run their "eager" path for one forward (explicit
softmax(QK^T * scale) with the model's causal, padding and ALiBi masks) and keep the
probabilities; every other layer keeps its backend. Nothing changes on the model.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from collections.abc import Iterable
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .attention import Attention

_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def attention_layers(model: nn.Module) -> dict[str, Attention]:
    """Every attention module of a zoo model by its module name, in forward order
    (encoder before decoder; in a block, self-attention before cross-attention)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, Attention)}


def _block_of(name: str) -> tuple[Optional[str], int]:
    """("encoder.blocks.", 3) for "encoder.blocks.3.attn"; (None, -1) outside a block stack."""
    match = _BLOCK_INDEX.search(name)
    return (name[: match.start(1)], int(match.group(1))) if match else (None, -1)


def _as_index(value) -> Optional[int]:
    """value as an int index (ints, numpy ints, one-element integer tensors), or None; bools are not indices."""
    try:
        return None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return None


def _select(names: list[str], layers, model_name: str) -> list[str]:
    if layers is None:
        return names
    if isinstance(layers, str) or _as_index(layers) is not None:
        layers = [layers]
    elif not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a block index, a module-name pattern or a list of them, got {layers!r}")
    depth: dict[str, int] = {}
    for name in names:
        stack, index = _block_of(name)
        if stack is not None:
            depth[stack] = max(depth.get(stack, 0), index + 1)
    chosen = set()
    for layer in layers:
        if not isinstance(layer, str):  # numpy ints too, as heads takes them
            index = _as_index(layer)
            if index is None:
                raise TypeError(f"layers holds block indices (int) or module-name patterns (str), got {layer!r}")
            layer = index
        if isinstance(layer, str):
            hits = fnmatch.filter(names, layer)
            if not hits:
                raise ValueError(f"layers: no attention module of {model_name} matches {layer!r}; "
                                 f"its attention modules are {names}")
            chosen.update(hits)
            continue
        for stack, n in depth.items():
            if not -n <= layer < n:
                raise ValueError(f"layers: block index {layer} is out of range for {stack.rstrip('.')} ({n} blocks)")
        chosen.update(name for name in names if _block_of(name)[0] is not None
                      and _block_of(name)[1] == layer % depth[_block_of(name)[0]])
    return [n for n in names if n in chosen]


def _head_indices(heads, num_heads: int) -> list[int]:
    """heads (one index or several; numpy ints too) as a list of ints in [-num_heads, num_heads).
    Encoder and decoder may differ in head count: num_heads is the fewest of the selected layers."""
    if _as_index(heads) is not None or isinstance(heads, str) or not isinstance(heads, Iterable):
        heads = [heads]  # one index (or one bad value, named below)
    out = []
    for h in heads:
        index = _as_index(h)
        if index is None or not -num_heads <= index < num_heads:
            raise ValueError(f"heads must be head indices in [0, {num_heads}) (the fewest heads of the selected "
                             f"layers) or negative from the end, got {h!r} in {heads!r}")
        out.append(index)
    if not out:
        raise ValueError("heads must hold at least one head index (None: all heads)")
    return out


def attention_maps(model: nn.Module, inputs: Any, layers: Optional[Sequence[Union[int, str]]] = None,
                   heads: Optional[Sequence[int]] = None) -> dict[str, Tensor]:
    """The attention probabilities of a zoo model's self- and cross-attention layers.

    Args:
        model: a zoo model (any module holding zoo.attention.Attention layers).
        inputs: what the model's forward takes: a tensor (model(inputs)), a tuple
            (model(*inputs)) or a dict (model(**inputs)).
        layers: None for every attention layer, or a list of block indices (negative from
            the end; index i selects block i of every stack, e.g. the encoder's and the
            decoder's, with their self- and cross-attention) and/or module-name patterns
            (fnmatch: "decoder.blocks.*.cross_attn").
        heads: None for all heads, or the head indices to keep (one index or several).
    Returns:
        {module name: float32 (B, len(heads), Sq, Sk)} in forward order. Each row is
        softmax(QK^T * scale) under the model's masks: it sums to 1 over the keys a query
        may see and is exactly 0 on masked keys (a row with no key at all is all zeros).
        The forward runs in eval mode (no dropout) and without gradients.
    Raises:
        ValueError / TypeError for unknown layers or head indices; ValueError if the
        model has no zoo attention layers.
    """
    found = attention_layers(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no zoo attention layers (zoo.attention.Attention)")
    names = _select(list(found), layers, type(model).__name__)
    if not names:
        raise ValueError(f"layers={layers!r} selects no attention module of {type(model).__name__}")
    if heads is not None:
        heads = _head_indices(heads, min(found[name].heads for name in names))
    # eval() for the forward, then every module back in its own mode (a frozen block may be in eval).
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    for name in names:
        found[name].keep_probs = True
    try:
        with torch.no_grad():
            if isinstance(inputs, dict):
                model(**inputs)
            elif isinstance(inputs, (tuple, list)):
                model(*inputs)
            else:
                model(inputs)
        maps = {}
        for name in names:
            probs = found[name].last_probs
            if probs is None:
                raise ValueError(f"{name} did not run in the forward (is it used for these inputs?)")
            maps[name] = (probs if heads is None else probs[:, heads]).float()
        return maps
    finally:
        for name in names:
            found[name].keep_probs = False
            found[name].last_probs = None
        for module, training in modes:
            module.training = training


def attention_rollout(maps: Sequence[Tensor], residual: float = 0.5) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each output token draws on each
    input token through a stack of self-attention layers.

    maps: per layer, in order, (B, H, S, S) probabilities (heads are averaged). Each layer's
    mean map is mixed with the identity for the residual path, A = (1 - residual) * P + residual * I,
    rows renormalized, and the layers multiplied: R = A_L @ ... @ A_1. Returns (B, S, S);
    rows sum to 1. A row of no attention at all (a padded query, which attention_maps gives
    as zeros) is taken as the identity row at every residual: the token carries only itself.
    """
    if isinstance(maps, Tensor) or not isinstance(maps, Sequence) or not maps:
        raise ValueError(f"attention_rollout needs a sequence (list) of per-layer (B, H, S, S) maps, got "
                         f"{f'a tensor of shape {tuple(maps.shape)}' if isinstance(maps, Tensor) else repr(maps)}")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1], got {residual}")
    rollout = None
    for layer, probs in enumerate(maps):
        if not isinstance(probs, Tensor) or probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
            raise ValueError(f"rollout needs square self-attention maps (B, H, S, S), got "
                             f"{tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__} "
                             f"at layer {layer}")
        if probs.shape[0] != maps[0].shape[0] or probs.shape[-1] != maps[0].shape[-1]:
            raise ValueError(f"every layer's map must have the first one's batch and tokens "
                             f"{(maps[0].shape[0], maps[0].shape[-1])}, got {(probs.shape[0], probs.shape[-1])} "
                             f"at layer {layer}")
        eye = torch.eye(probs.shape[-1], dtype=torch.float64, device=probs.device)
        mixed = (1 - residual) * probs.double().mean(1) + residual * eye
        total = mixed.sum(-1, keepdim=True)
        mixed = torch.where(total > 0, mixed / total.clamp_min(torch.finfo(torch.float64).tiny), eye)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout.float()
