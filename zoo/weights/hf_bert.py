"""Hugging Face BERT (BertModel, BertForMaskedLM, BertForSequenceClassification) -> zoo.text.BertModel.

HF keeps query, key and value as three Linears; the backbone fuses them into one
`qkv` Linear with output rows [q | k | v]. Every source tensor must be consumed and
every zoo parameter set: a weight this file does not understand is an error, not a
silent drop.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ..registry import build_config
from ..text import BertConfig, BertModel, bert_backbone
from ._common import StateReader, load_exactly, warn_dropped

# HF hidden_act -> backbone MLP type.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}

# BertForPreTraining's next-sentence head: no zoo counterpart, no part of an MLM's or encoder's output.
NSP_PREFIX = "cls.seq_relationship."

# Buffers some checkpoints carry; they hold no weights.
IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


def _bert_config(config, pooler: bool, mlm_head: bool, num_classes: int, overrides: dict) -> BertConfig:
    def need(condition, message):
        if not condition:
            raise ValueError(f"unsupported BERT config: {message}")

    act = getattr(config, "hidden_act", "gelu")
    need(act in ACTIVATIONS, f"hidden_act {act!r} (supported: {', '.join(ACTIVATIONS)})")
    need(getattr(config, "position_embedding_type", "absolute") == "absolute", "only absolute position embeddings")
    need(not getattr(config, "is_decoder", False), "is_decoder=True (this converter builds an encoder)")
    need(not getattr(config, "add_cross_attention", False), "add_cross_attention=True")
    problem = getattr(config, "problem_type", None)
    # transformers trains num_labels=1 (problem_type None) as regression; the zoo head, with single-label CE.
    need(not num_classes or problem == "single_label_classification" or (problem is None and num_classes > 1),
         f"a sequence classifier with problem_type={problem!r} and num_labels={num_classes} (transformers "
         f"trains it with {'MSE' if problem == 'regression' or num_classes == 1 else 'BCE'}; the zoo classifier "
         f"with single-label cross-entropy)")
    backbone = bert_backbone(
        config.hidden_size, config.num_hidden_layers, config.num_attention_heads, mlp=ACTIVATIONS[act],
        mlp_hidden=config.intermediate_size, norm_eps=config.layer_norm_eps,
        max_seq_len=config.max_position_embeddings, dropout=config.hidden_dropout_prob,
        attn_dropout=config.attention_probs_dropout_prob)
    classifier_dropout = getattr(config, "classifier_dropout", None)
    return build_config(BertConfig, backbone, overrides, vocab_size=config.vocab_size,
                        type_vocab_size=config.type_vocab_size, pad_token_id=config.pad_token_id,
                        pooler=pooler, mlm_head=mlm_head, num_classes=num_classes,
                        classifier_dropout=config.hidden_dropout_prob if classifier_dropout is None
                        else classifier_dropout)


def convert(state_dict: dict[str, Tensor], config, **overrides) -> BertModel:
    """A zoo BertModel holding the weights of a HF BERT state dict.

    Keys are BertModel's (`embeddings.*`, `encoder.*`, `pooler.*`) or, under `bert.`,
    BertForMaskedLM's (`cls.predictions.*`) / BertForSequenceClassification's
    (`classifier.*`); the heads present decide the zoo model's heads. config: the HF
    BertConfig. overrides go to the zoo config (e.g. attn_backend="sdpa"). Raises
    ValueError for an unsupported config, an untied MLM decoder, or tensors left over.
    Legacy LayerNorm names (gamma, beta) are read as weight and bias; a pretraining
    checkpoint's next-sentence head is left out with a warning.
    """
    # Checkpoints converted from the original TensorFlow BERT name LayerNorm's tensors gamma and beta.
    state_dict = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
                  for k, v in state_dict.items()}
    prefix = "bert." if any(k.startswith("bert.") for k in state_dict) else ""
    src = StateReader(state_dict, prefix)
    mlm_head = "cls.predictions.bias" in state_dict
    num_classes = state_dict["classifier.weight"].shape[0] if "classifier.weight" in state_dict else 0
    pooler = src.has("pooler.dense.weight")
    model = BertModel(_bert_config(config, pooler, mlm_head, num_classes, overrides))

    words = src.take("embeddings.word_embeddings.weight")
    ours = {
        "token_embed.weight": words,
        "type_embed.weight": src.take("embeddings.token_type_embeddings.weight"),
        "backbone.pos_embed.weight": src.take("embeddings.position_embeddings.weight"),
        "backbone.input_norm.weight": src.take("embeddings.LayerNorm.weight"),
        "backbone.input_norm.bias": src.take("embeddings.LayerNorm.bias"),
    }
    for i in range(config.num_hidden_layers):
        hf, zoo = f"encoder.layer.{i}.", f"backbone.blocks.{i}."
        for kind in ("weight", "bias"):
            ours[zoo + f"attn.qkv.{kind}"] = torch.cat(
                [src.take(hf + f"attention.self.{name}.{kind}") for name in ("query", "key", "value")])
            ours[zoo + f"attn.proj.{kind}"] = src.take(hf + f"attention.output.dense.{kind}")
            ours[zoo + f"norm1.{kind}"] = src.take(hf + f"attention.output.LayerNorm.{kind}")
            ours[zoo + f"mlp.fc1.{kind}"] = src.take(hf + f"intermediate.dense.{kind}")
            ours[zoo + f"mlp.fc2.{kind}"] = src.take(hf + f"output.dense.{kind}")
            ours[zoo + f"norm2.{kind}"] = src.take(hf + f"output.LayerNorm.{kind}")
    for kind in ("weight", "bias"):
        if pooler:
            ours[f"pooler.{kind}"] = src.take(f"pooler.dense.{kind}")
        if num_classes:
            ours[f"classifier.1.{kind}"] = src.take(f"classifier.{kind}", prefix="")
        if mlm_head:
            ours[f"mlm.dense.{kind}"] = src.take(f"cls.predictions.transform.dense.{kind}", prefix="")
            ours[f"mlm.norm.{kind}"] = src.take(f"cls.predictions.transform.LayerNorm.{kind}", prefix="")
    if mlm_head:
        ours["mlm.bias"] = src.take("cls.predictions.bias", prefix="")
        # The decoder is tied to the word embeddings and its bias to cls.predictions.bias;
        # checkpoints may store the tied copies, which must then agree.
        tied_copies = {"cls.predictions.decoder.weight": words, "cls.predictions.decoder.bias": ours["mlm.bias"]}
        for key, tied in tied_copies.items():
            if key in state_dict and not torch.equal(src.take(key, prefix=""), tied):
                raise ValueError(f"{key} is not tied to its shared tensor; untied MLM decoders are not supported")
    nsp = [k for k in state_dict if k.startswith(NSP_PREFIX)]
    if nsp:  # BERT's pretraining checkpoints carry it beside the MLM head
        for key in nsp:
            src.take(key, prefix="")
        warn_dropped("Hugging Face BERT", "the next-sentence-prediction head", nsp)
    src.check_all_used(IGNORED_SUFFIXES)
    load_exactly(model, ours, "Hugging Face BERT")
    return model
