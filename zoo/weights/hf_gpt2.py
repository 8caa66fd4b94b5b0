"""Hugging Face GPT-2 (GPT2Model, GPT2LMHeadModel) -> zoo.text.GPT.

GPT-2 stores its projections as Conv1D, whose weight is (in, out): the transpose of
nn.Linear's. `c_attn` already fuses [q | k | v] in the backbone's order. Every source
tensor must be consumed (the causal-mask buffers of old checkpoints are ignored by
name) and every zoo parameter set.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..registry import build_config
from ..text import GPT, GPTConfig, gpt_backbone
from ._common import StateReader, load_exactly, warn_not_reproduced

# HF activation_function -> backbone MLP type.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}

# Causal-mask buffers older GPT-2 checkpoints carry; they hold no weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def _gpt_config(config, tie: bool, overrides: dict, generation: Optional[dict] = None) -> GPTConfig:
    def need(condition, message):
        if not condition:
            raise ValueError(f"unsupported GPT-2 config: {message}")

    act = config.activation_function
    need(act in ACTIVATIONS, f"activation_function {act!r} (supported: {', '.join(ACTIVATIONS)})")
    need(getattr(config, "scale_attn_weights", True), "scale_attn_weights=False")
    need(not getattr(config, "scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=True")
    need(not getattr(config, "add_cross_attention", False), "add_cross_attention=True")
    if config.embd_pdrop != config.resid_pdrop:
        warn_not_reproduced("GPT-2", f"embd_pdrop={config.embd_pdrop} (the zoo model's one dropout rate, for the "
                                     f"embeddings and the residual branches, is resid_pdrop={config.resid_pdrop})")
    backbone = gpt_backbone(
        config.n_embd, config.n_layer, config.n_head, mlp=ACTIVATIONS[act],
        mlp_hidden=config.n_inner if config.n_inner is not None else 4 * config.n_embd,
        norm_eps=config.layer_norm_epsilon, max_seq_len=config.n_positions,
        dropout=config.resid_pdrop, attn_dropout=config.attn_pdrop)
    # transformers' generate() stops at eos_token_id (an int or a list) by default, read from the
    # generation config; an id outside the vocabulary never comes, and a pad id outside it
    # (transformers only warns) is dropped.
    def in_vocab(i):
        return not isinstance(i, bool) and isinstance(i, int) and 0 <= i < config.vocab_size

    defaults = generation if generation is not None else {
        name: getattr(config, name, None) for name in ("eos_token_id", "pad_token_id")}
    eos = defaults.get("eos_token_id")
    if isinstance(eos, (list, tuple)):
        eos = [i for i in eos if in_vocab(i)] or None
    elif not in_vocab(eos):
        eos = None
    pad = defaults.get("pad_token_id")
    return build_config(GPTConfig, backbone, overrides, vocab_size=config.vocab_size,
                        pad_token_id=pad if in_vocab(pad) else None, eos_token_id=eos, tie_embeddings=tie)


def convert(state_dict: dict[str, Tensor], config, generation: Optional[dict] = None, **overrides) -> GPT:
    """A zoo GPT holding the weights of a HF GPT-2 state dict.

    Keys are GPT2Model's (`wte`, `wpe`, `h.N.*`, `ln_f`) or, under `transformer.`,
    GPT2LMHeadModel's with `lm_head.weight` (tied to wte unless the checkpoint holds a
    different matrix). config: the HF GPT2Config; generation: the generation config's dict,
    whose eos_token_id / pad_token_id (else config's) become generate()'s defaults.
    overrides go to the zoo config.
    Raises ValueError for an unsupported config or tensors left over.
    """
    prefix = "transformer." if any(k.startswith("transformer.") for k in state_dict) else ""
    src = StateReader(state_dict, prefix)
    words = src.take("wte.weight")
    head = src.take("lm_head.weight", prefix="") if "lm_head.weight" in state_dict else None
    tie = head is None or head is words or head.data_ptr() == words.data_ptr() or head.equal(words)
    model = GPT(_gpt_config(config, tie, overrides, generation))

    ours = {
        "token_embed.weight": words,
        "backbone.pos_embed.weight": src.take("wpe.weight"),
        "backbone.norm.weight": src.take("ln_f.weight"),
        "backbone.norm.bias": src.take("ln_f.bias"),
    }
    if not tie:
        ours["lm_head.weight"] = head
    for i in range(config.n_layer):
        hf, zoo = f"h.{i}.", f"backbone.blocks.{i}."
        for hf_name, zoo_name in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                                  ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            ours[zoo + zoo_name + ".weight"] = src.take(hf + hf_name + ".weight").t()  # Conv1D is (in, out)
            ours[zoo + zoo_name + ".bias"] = src.take(hf + hf_name + ".bias")
        for hf_name, zoo_name in (("ln_1", "norm1"), ("ln_2", "norm2")):
            for kind in ("weight", "bias"):
                ours[f"{zoo}{zoo_name}.{kind}"] = src.take(f"{hf}{hf_name}.{kind}")
    src.check_all_used(IGNORED_SUFFIXES)
    load_exactly(model, ours, "Hugging Face GPT-2")
    return model
