"""The reference implementation of a zoo model at the same configuration, for `zoo compare`.

The inverse of zoo.weights: where zoo.from_timm / zoo.from_hf read a timm or Hugging
Face model into a zoo config, reference_for builds the timm VisionTransformer, HF
BertForMaskedLM, HF GPT2LMHeadModel or HF WhisperEncoder that a zoo model's config
describes, randomly initialized (nothing is downloaded). A config the reference cannot
express (rotary positions, RMSNorm, grouped-query attention, ...) has no reference, and
the reason says which option. HF models use their "sdpa" attention, timm its fused
(SDPA) attention: each peer's default fast path in eager mode, as in ANCHORS.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from zoo.config import TransformerConfig
from zoo.speech import SpeechEncoder
from zoo.text import GPT, BertModel
from zoo.vision import VisionTransformer, to_pair

from .compare_measure import Workload, output_loss

HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}  # backbone MLP -> HF hidden_act


@dataclass
class Reference:
    """A reference model at our model's configuration and how to run it on a Workload."""

    name: str  # e.g. "HF GPT2LMHeadModel"
    build: Callable[[], nn.Module]  # builds it on the current default device
    loss: Callable[[nn.Module, Workload], Tensor]  # the same loss as ours on the same inputs
    forward: Callable[[nn.Module, Workload], Any]
    param_difference: int = 0  # our trainable parameters minus its, by construction
    param_note: str = ""  # why they differ, when they do


class NoReference(ValueError):
    """The model has no reference implementation at its configuration; the message says why."""


def _need(condition: bool, why: str) -> None:
    if not condition:
        raise NoReference(why)


def _plain_backbone(bb: TransformerConfig, what: str) -> None:
    """The options no reference block has: raises NoReference naming the first one set."""
    _need(bb.norm == "layernorm" and bb.norm_bias, f"{what} has LayerNorm with bias only (norm={bb.norm!r}, "
                                                   f"norm_bias={bb.norm_bias})")
    _need(bb.kv_heads in (None, bb.heads), f"{what} has no grouped-query attention (kv_heads={bb.kv_heads})")
    _need(bb.head_dim in (None, bb.dim // bb.heads), f"{what} has head_dim = dim / heads only")
    _need(not bb.qk_norm, f"{what} has no qk_norm")
    _need(not bb.cross_attention, f"{what} has no cross-attention")
    _need(bb.qkv_bias and bb.proj_bias and bb.mlp_bias, f"{what} has biases in every projection")
    _need(bb.mlp in HF_ACTIVATIONS, f"{what}: mlp={bb.mlp!r} has no counterpart (gelu, gelu_tanh, relu)")


def _hf_plain(bb: TransformerConfig, what: str) -> None:
    _plain_backbone(bb, what)
    _need(bb.layer_scale is None, f"{what} has no layer scale")
    _need(bb.drop_path == 0.0, f"{what} has no stochastic depth (drop_path={bb.drop_path})")
    _need(not bb.checkpointing, f"{what} is compared without activation checkpointing")


def _vit_reference(cfg) -> Reference:
    import timm.models.vision_transformer as timm_vit

    bb = cfg.backbone
    _plain_backbone(bb, "timm's VisionTransformer")
    _need(bb.mlp in ("gelu", "gelu_tanh"), f"timm's ViT block takes a GELU here, not mlp={bb.mlp!r}")
    _need(int(bb.dim * (bb.mlp_width / bb.dim)) == bb.mlp_width, "the MLP width is not dim * a ratio timm rounds "
                                                                   "back to it")
    _need(bb.prenorm, "timm's ViT blocks are pre-norm")
    _need(cfg.patch_bias == (not bb.input_norm), "timm's patch projection has a bias exactly when there is no "
                                                 "input norm (pre_norm)")
    _need(not bb.checkpointing, "compared without activation checkpointing")
    kwargs = dict(
        img_size=to_pair(cfg.img_size, "img_size"), patch_size=to_pair(cfg.patch_size, "patch_size"),
        in_chans=cfg.in_chans, num_classes=cfg.num_classes, global_pool=cfg.global_pool, embed_dim=bb.dim,
        depth=bb.depth, num_heads=bb.heads, mlp_ratio=bb.mlp_width / bb.dim, qkv_bias=bb.qkv_bias,
        init_values=bb.layer_scale, class_token=cfg.class_token, no_embed_class=cfg.no_embed_class,
        reg_tokens=cfg.reg_tokens, pre_norm=bb.input_norm, final_norm=bb.final_norm, fc_norm=cfg.use_fc_norm,
        # Our `dropout` acts on the input embeddings and on each residual branch: timm's pos and proj
        # drops (proj_drop_rate also sets timm's dropout after the MLP's activation: removed in build).
        drop_rate=cfg.head_dropout, pos_drop_rate=bb.dropout, proj_drop_rate=bb.dropout,
        attn_drop_rate=bb.attn_dropout, drop_path_rate=bb.drop_path,
        norm_layer=functools.partial(nn.LayerNorm, eps=bb.norm_eps),
        act_layer=functools.partial(nn.GELU, approximate="tanh" if bb.mlp == "gelu_tanh" else "none"))

    def loss(model, w):
        out = model(w.inputs["images"])
        return F.cross_entropy(out, w.inputs["labels"]) if cfg.num_classes else output_loss(out)

    def build():
        model = timm_vit.VisionTransformer(**kwargs)
        for block in model.blocks:
            block.mlp.drop1 = nn.Identity()  # ours has no dropout inside the MLP
        return model

    return Reference("timm VisionTransformer", build, loss, lambda model, w: model(w.inputs["images"]))


def _bert_reference(cfg) -> Reference:
    import transformers

    bb = cfg.backbone
    _need(cfg.mlm_head and not cfg.pooler and not cfg.num_classes,
          "only the masked-LM model (mlm_head=True, no pooler or classifier) is compared with BertForMaskedLM")
    _hf_plain(bb, "HF BERT")
    _need(not bb.prenorm and not bb.final_norm and bb.input_norm,
          "HF BERT is post-norm with a norm over the embeddings (prenorm=False, final_norm=False, input_norm=True)")
    _need(bb.positions == "learned", f"HF BERT has learned absolute positions only, not {bb.positions!r}")
    config = dict(
        vocab_size=cfg.vocab_size, hidden_size=bb.dim, num_hidden_layers=bb.depth, num_attention_heads=bb.heads,
        intermediate_size=bb.mlp_width, hidden_act=HF_ACTIVATIONS[bb.mlp], hidden_dropout_prob=bb.dropout,
        attention_probs_dropout_prob=bb.attn_dropout, max_position_embeddings=bb.max_seq_len,
        type_vocab_size=cfg.type_vocab_size, layer_norm_eps=bb.norm_eps, pad_token_id=cfg.pad_token_id,
        attn_implementation="sdpa")

    def build():
        return transformers.BertForMaskedLM(transformers.BertConfig(**config))

    return Reference("HF BertForMaskedLM", build,
                     lambda model, w: model(input_ids=w.inputs["input_ids"], labels=w.inputs["labels"]).loss,
                     lambda model, w: model(input_ids=w.inputs["input_ids"]).logits)


def _gpt2_reference(cfg) -> Reference:
    import transformers

    bb = cfg.backbone
    _hf_plain(bb, "HF GPT-2")
    _need(bb.prenorm and bb.final_norm and not bb.input_norm,
          "HF GPT-2 is pre-norm with a final norm and no input norm")
    _need(bb.positions == "learned", f"HF GPT-2 has learned absolute positions only, not {bb.positions!r}")
    config = dict(
        vocab_size=cfg.vocab_size, n_positions=bb.max_seq_len, n_embd=bb.dim, n_layer=bb.depth, n_head=bb.heads,
        n_inner=bb.mlp_width, activation_function=HF_ACTIVATIONS[bb.mlp], resid_pdrop=bb.dropout,
        embd_pdrop=bb.dropout, attn_pdrop=bb.attn_dropout, layer_norm_epsilon=bb.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")

    def build():
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))

    return Reference("HF GPT2LMHeadModel", build,
                     lambda model, w: model(input_ids=w.inputs["input_ids"], labels=w.inputs["input_ids"]).loss,
                     lambda model, w: model(input_ids=w.inputs["input_ids"]).logits)


def _whisper_reference(model: SpeechEncoder, w: Optional[Workload]) -> Reference:
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = model.cfg
    bb = cfg.backbone
    _need(type(model) is SpeechEncoder, f"a {type(model).__name__} has a head; Whisper's encoder has none")
    _hf_plain(bb, "HF Whisper's encoder")
    _need(bb.prenorm and bb.final_norm and not bb.input_norm, "Whisper's encoder is pre-norm with a final norm")
    _need(bb.positions == "sinusoidal", f"Whisper's encoder has sinusoidal positions, not {bb.positions!r}")
    _need(bb.norm_eps == 1e-5, f"Whisper's LayerNorms have eps 1e-5, not {bb.norm_eps}")
    if w is not None:
        _need(w.extra["frames"] == 2 * bb.max_seq_len,
              f"Whisper's encoder takes exactly 2 * max_source_positions = {2 * bb.max_seq_len} frames, not "
              f"{w.extra['frames']}")
    config = dict(
        d_model=bb.dim, encoder_layers=bb.depth, encoder_attention_heads=bb.heads, encoder_ffn_dim=bb.mlp_width,
        num_mel_bins=cfg.n_mels, max_source_positions=bb.max_seq_len, dropout=bb.dropout,
        attention_dropout=bb.attn_dropout, activation_dropout=0.0, activation_function=HF_ACTIVATIONS[bb.mlp],
        encoder_layerdrop=0.0, attn_implementation="sdpa",
        # The decoder is never built; small sizes keep the config cheap.
        decoder_layers=1, decoder_attention_heads=1, decoder_ffn_dim=4, vocab_size=8, max_target_positions=8,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)

    def forward(ref, work):
        return ref(input_features=work.inputs["log_mels"]).last_hidden_state

    return Reference(
        "HF WhisperEncoder", lambda: WhisperEncoder(transformers.WhisperConfig(**config)),
        lambda ref, work: output_loss(forward(ref, work)), forward,
        # Whisper's key projection has no bias; ours is the fused qkv Linear's slice (zoo.weights.hf_whisper).
        # Whisper's position table is a frozen parameter, ours a buffer: neither is trained.
        param_difference=bb.depth * bb.dim,
        param_note=f"ours + {bb.depth} x {bb.dim}: the key bias of the fused qkv projection (Whisper's k_proj "
                   f"has none)")


def reference_for(model: nn.Module, workload: Optional[Workload] = None) -> Reference:
    """The reference implementation at `model`'s configuration (and workload, where the
    reference constrains the input size); raises NoReference saying why there is none."""
    if isinstance(model, VisionTransformer):
        return _vit_reference(model.cfg)
    if isinstance(model, BertModel):
        return _bert_reference(model.cfg)
    if isinstance(model, GPT):
        return _gpt2_reference(model.cfg)
    if isinstance(model, SpeechEncoder):
        return _whisper_reference(model, workload)
    raise NoReference(f"no reference implementation for a {type(model).__name__} (compared with itself only)")
