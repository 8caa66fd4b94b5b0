"""Hugging Face Whisper -> zoo SpeechEncoder (the encoder only).

Accepts the state dicts of WhisperModel (`encoder.*`), WhisperForConditionalGeneration
(`model.encoder.*`) and a bare WhisperEncoder (no prefix). The decoder (`decoder.*`,
`model.decoder.*`) and the LM projection (`proj_out.*`) are skipped on purpose: the
zoo model is the encoder. Any other key, or an encoder weight left unused, is an error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import TransformerConfig
from ..registry import build_config
from ..speech import SpeechConfig, SpeechEncoder, speech_model
from ._common import load_exactly, warn_not_reproduced

# Hugging Face activation names -> the backbone's MLP types.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_DECODER_PREFIXES = ("decoder.", "model.decoder.", "proj_out.")


def _encoder_prefix(state_dict: dict[str, Tensor]) -> str:
    for prefix in ("model.encoder.", "encoder.", ""):
        if f"{prefix}conv1.weight" in state_dict:
            return prefix
    raise ValueError("not a Whisper state dict: found no conv1.weight (bare, encoder. or model.encoder. prefix)")


def convert(state_dict: dict[str, Tensor], config, **overrides) -> SpeechEncoder:
    """A zoo SpeechEncoder (or a head model, see zoo.speech.speech_model) with the weights of
    a Hugging Face Whisper encoder; outputs match `model.get_encoder()(input_features)`.

    config: the transformers WhisperConfig. overrides go to the zoo config (e.g.
    attn_backend="sdpa", or num_classes=12 for a classifier whose head stays at init).
    Raises ValueError for an unsupported activation, an unexpected key, or an encoder
    weight that finds no place in the zoo model.
    """
    activation = getattr(config, "activation_function", "gelu")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unsupported Whisper activation_function {activation!r}; supported: "
                         f"{', '.join(_ACTIVATIONS)}")
    for name in ("activation_dropout", "encoder_layerdrop"):
        if getattr(config, name, 0.0):
            warn_not_reproduced("Whisper", f"{name}={getattr(config, name)}")
    backbone = TransformerConfig(
        dim=config.d_model, depth=config.encoder_layers, heads=config.encoder_attention_heads,
        mlp=_ACTIVATIONS[activation], mlp_hidden=config.encoder_ffn_dim, norm="layernorm", norm_eps=1e-5,
        prenorm=True, final_norm=True, positions="sinusoidal", max_seq_len=config.max_source_positions,
        dropout=config.dropout, attn_dropout=config.attention_dropout)
    model = speech_model(build_config(SpeechConfig, backbone, overrides, n_mels=config.num_mel_bins))

    prefix = _encoder_prefix(state_dict)
    source = {}
    for key, value in state_dict.items():
        if key.startswith(_DECODER_PREFIXES):
            continue  # the decoder is not part of the zoo model
        if not key.startswith(prefix):
            raise ValueError(f"unexpected key {key!r} in a Whisper state dict")
        source[key[len(prefix):]] = value

    dim = backbone.dim
    target = {}

    def take(name: str) -> Tensor:
        if name not in source:
            raise ValueError(f"the Whisper state dict has no {prefix}{name}")
        return source.pop(name)

    for conv in ("conv1", "conv2"):
        target[f"{conv}.weight"], target[f"{conv}.bias"] = take(f"{conv}.weight"), take(f"{conv}.bias")
    target["backbone.pos_table"] = take("embed_positions.weight")
    for i in range(backbone.depth):
        hf, ours = f"layers.{i}.", f"backbone.blocks.{i}."
        attn = hf + "self_attn."
        q_w, k_w, v_w = (take(f"{attn}{p}_proj.weight") for p in "qkv")
        q_b, v_b = take(f"{attn}q_proj.bias"), take(f"{attn}v_proj.bias")
        # Whisper's keys have no bias. A key bias b adds q.b to every score of a query's
        # row, which softmax cancels, so a zero bias in our fused qkv is exact.
        target[ours + "attn.qkv.weight"] = torch.cat([q_w, k_w, v_w], dim=0)
        target[ours + "attn.qkv.bias"] = torch.cat([q_b, torch.zeros_like(q_b), v_b], dim=0)
        target[ours + "attn.proj.weight"] = take(f"{attn}out_proj.weight")
        target[ours + "attn.proj.bias"] = take(f"{attn}out_proj.bias")
        for theirs, mine in (("self_attn_layer_norm", "norm1"), ("final_layer_norm", "norm2"),
                             ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
            target[f"{ours}{mine}.weight"] = take(f"{hf}{theirs}.weight")
            target[f"{ours}{mine}.bias"] = take(f"{hf}{theirs}.bias")
    target["backbone.norm.weight"], target["backbone.norm.bias"] = take("layer_norm.weight"), take("layer_norm.bias")
    if source:
        raise ValueError(f"Whisper weights with no place in the zoo model: {', '.join(sorted(source))}")
    if target["backbone.pos_table"].shape != (backbone.max_seq_len, dim):
        raise ValueError(f"embed_positions has shape {tuple(target['backbone.pos_table'].shape)}, expected "
                         f"({backbone.max_seq_len}, {dim}) from the config")

    # The front end's STFT window and mel filters are computed from the config, and a
    # head (when asked for with num_classes / vocab_size) keeps its initialization.
    return load_exactly(model, target, "Hugging Face Whisper encoder", keep_prefixes=("frontend.", "head."))
