"""The zoo's public API under bad or unusual input: a clear error naming the argument, never a
silent wrong result, a NaN, or a traceback from deep inside torch.

Oracles: the documented contract (errors name the argument and the expected value), the same
call with the input in its documented canonical form (a bool mask, images in the model's dtype),
and Hugging Face's ViT for how images of another dtype are treated.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import kernels
import zoo
from zoo.speech import SpeechConfig

pytestmark = pytest.mark.usefixtures("reference_attention")


# --------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("mlp_ratio", "4"), ("mlp_ratio", None), ("mlp_ratio", math.inf), ("norm_eps", None), ("norm_eps", math.inf),
    ("dropout", "0.1"), ("attn_dropout", None), ("drop_path", "0"), ("layer_scale", "1e-5"),
    ("layer_scale", math.nan), ("rotary_base", "1e4"),
])
def test_backbone_config_names_a_field_that_is_not_a_finite_number(field, value):
    extra = dict(positions="rotary") if field == "rotary_base" else {}
    with pytest.raises(ValueError, match=f"TransformerConfig: {field} must be a finite number"):
        zoo.TransformerConfig(**{field: value}, **extra)


def test_backbone_config_takes_numpy_floats():  # configs built from numpy values stay valid
    cfg = zoo.TransformerConfig(dim=32, heads=2, mlp_ratio=np.float32(2.0), dropout=np.float64(0.1))
    assert cfg.mlp_width == 64


@pytest.mark.parametrize("name, overrides, field", [
    ("seq2seq_tiny", dict(src_vocab_size=True), "src_vocab_size"),
    ("seq2seq_tiny", dict(pad_id=True), "pad_id"),
    ("bert_tiny", dict(pad_token_id=1.5), "pad_token_id"),
    ("bert_tiny", dict(pad_token_id=True), "pad_token_id"),
    ("speech_tiny", dict(n_mels=True), "n_mels must be a positive int"),
    ("speech_tiny", dict(log_floor=math.nan), "log_floor"),
    ("vit_tiny_patch16_224", dict(head_dropout="0.1"), "head_dropout must be in"),
    ("vit_tiny_patch16_224", dict(pos_init_std=math.inf), "pos_init_std must be a finite number"),
    ("bert_tiny", dict(classifier_dropout=None), "classifier_dropout must be in"),
])
def test_model_configs_name_a_bad_field(name, overrides, field):
    with pytest.raises(ValueError, match=field):
        zoo.create_model(name, depth=1, **overrides)


# Before: only the backbone's bools were checked, and "false" from a YAML file or a command line
# read as True in the models' own fields (a tied head, an fc_norm, a shared embedding table).
@pytest.mark.parametrize("name, field, value", [
    ("gpt_nano", "tie_embeddings", "false"), ("bert_tiny", "mlm_head", "false"), ("bert_tiny", "pooler", 0),
    ("seq2seq_tiny", "share_embeddings", "false"), ("seq2seq_tiny", "tie_lm_head", "no"),
    ("seq2seq_tiny", "scale_embeddings", 1), ("vit_digits", "class_token", "false"),
    ("vit_digits", "no_embed_class", "false"), ("vit_digits", "fc_norm", "false"),
    ("vit_digits", "patch_bias", None), ("vit_digits", "pos_antialias", "true"), ("gpt_nano", "causal", "false"),
])
def test_model_configs_refuse_a_non_bool_for_a_bool_field(name, field, value):
    with pytest.raises(ValueError, match=rf"Config: {field} must be a bool.*got {re.escape(repr(value))}"):
        zoo.create_model(name, **{field: value})


def test_optional_bool_fields_take_none():
    assert zoo.create_model("vit_digits", fc_norm=None).cfg.fc_norm is None


def test_nan_log_floor_is_refused_rather_than_giving_nan_features():
    # Before: accepted, and clamp(min=nan) made every log-mel NaN.
    with pytest.raises(ValueError, match="log_floor"):
        SpeechConfig(log_floor=float("nan"))


# --------------------------------------------------------------------------------------
# Generation arguments
# --------------------------------------------------------------------------------------


def _gpt():
    return zoo.create_model("gpt_nano", dim=32, depth=1, heads=2, vocab_size=50).eval()


def _seq2seq():
    return zoo.create_model("seq2seq_tiny", dim=32, depth=1, heads=2, src_vocab_size=40, tgt_vocab_size=40).eval()


@pytest.mark.parametrize("options, name", [
    (dict(temperature=float("nan")), "temperature"),  # before: RuntimeError inside torch.multinomial
    (dict(temperature=True), "temperature"),
    (dict(top_p=True), "top_p"),  # before: read as top_p = 1.0
])
def test_sampling_options_are_checked_before_sampling(options, name):
    ids = torch.randint(0, 50, (2, 3))
    with pytest.raises(ValueError, match=name):
        _gpt().generate(ids, max_new_tokens=2, do_sample=True, **options)


def test_a_fractional_pad_token_id_is_refused_not_truncated():
    ids = torch.randint(0, 50, (2, 3))
    with pytest.raises(TypeError, match="pad_token_id"):  # before: int(1.5) == 1 emitted silently
        _gpt().generate(ids, max_new_tokens=2, eos_token_id=3, pad_token_id=1.5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_seq2seq_refuses_special_ids_outside_the_target_vocabulary(num_beams):
    model, src = _seq2seq(), torch.randint(3, 40, (2, 4))
    # As GPT.generate does for eos_token_id: an id the model cannot emit would never stop a row.
    with pytest.raises(ValueError, match=r"eos_id 40 is outside the target vocabulary \[0, 40\)"):
        model.generate(src, max_new_tokens=3, num_beams=num_beams, eos_id=40)
    with pytest.raises(ValueError, match=r"bos_id 99 is outside"):  # before: an error about tgt_ids
        model.generate(src, max_new_tokens=3, num_beams=num_beams, bos_id=99)
    # A list was compared elementwise with the batch's tokens (greedy) or never matched (beams).
    with pytest.raises(TypeError, match="eos_id must be an int"):
        model.generate(src, max_new_tokens=3, num_beams=num_beams, eos_id=[2, 3])
    with pytest.raises(ValueError, match="max_new_tokens"):  # True is not 1 token
        model.generate(src, max_new_tokens=True, num_beams=num_beams)
    # A negative eos_id is the documented "no stop token": every row decodes max_new_tokens.
    assert model.generate(src, max_new_tokens=3, num_beams=num_beams, eos_id=-1).shape == (2, 4)


def test_seq2seq_length_penalty_must_be_a_number():
    with pytest.raises(ValueError, match="length_penalty"):
        _seq2seq().generate(torch.randint(3, 40, (1, 4)), max_new_tokens=2, num_beams=2, length_penalty="1")


# --------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------


def test_seq2seq_masks_take_integer_dtypes_as_hugging_face_attention_masks():
    model = _seq2seq()
    src, tgt = torch.randint(3, 40, (2, 5)), torch.randint(3, 40, (2, 4))
    src_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    tgt_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        expected = model(src, tgt, src_mask=src_mask.bool(), tgt_mask=tgt_mask.bool())
        # Before: src_mask took 0/1 integers but tgt_mask raised "key_padding_mask must be bool".
        assert torch.equal(model(src, tgt, src_mask=src_mask, tgt_mask=tgt_mask), expected)
        memory, used = model.encode(src, src_mask)
        cache = model.decoder.new_cache()
        step = model.decode_step(tgt, memory, used, cache=cache, tgt_mask=tgt_mask)
        assert torch.allclose(step, expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"tgt_mask must have shape \(2, 4\)"):
        model(src, tgt, tgt_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="src_mask must be a torch.Tensor"):  # before: AttributeError
        model(src, tgt, src_mask=src_mask.tolist())


# --------------------------------------------------------------------------------------
# ViT inputs
# --------------------------------------------------------------------------------------


def test_vit_takes_images_of_another_float_dtype_as_hugging_face_does():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=16, patch_size=8, num_labels=3)
    reference = transformers.ViTForImageClassification(cfg).eval()
    model = zoo.from_hf(reference)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(images).logits  # HF casts the pixels to the patch projection's dtype
        # Before: "Input type (double) and bias type (float) should be the same" from the convolution.
        assert torch.allclose(model(images), expected, atol=1e-5)
        model, reference = model.to(torch.bfloat16), reference.to(torch.bfloat16)
        out = model(images.float())
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, model(images.bfloat16()))


@pytest.mark.parametrize("images, error, match", [
    (torch.zeros(1, 1, 8, 8, dtype=torch.long), TypeError, "images must be a floating-point tensor"),
    (torch.zeros(1, 1, 0, 0), ValueError, r"image size \(0, 0\) must be divisible by the patch size"),
])
def test_vit_names_bad_images(images, error, match):
    model = zoo.create_model("vit_digits", depth=1).eval()
    with pytest.raises(error, match=match):
        model(images)


# --------------------------------------------------------------------------------------
# attention_maps selections
# --------------------------------------------------------------------------------------


def test_attention_map_layers_take_numpy_and_tensor_indices_as_heads_do():
    model = zoo.create_model("vit_digits", depth=2).eval()
    images = torch.randn(1, 1, 8, 8)
    expected = zoo.attention_maps(model, images, layers=[-1], heads=[1])
    for layers in ([np.int64(-1)], np.int64(1), torch.tensor(-1)):  # before: TypeError for these
        maps = zoo.attention_maps(model, images, layers=layers, heads=np.int64(1))
        assert list(maps) == list(expected) and torch.equal(maps["backbone.blocks.1.attn"],
                                                            expected["backbone.blocks.1.attn"])
    with pytest.raises(TypeError, match="layers must be a block index"):
        zoo.attention_maps(model, images, layers=1.5)
    with pytest.raises(ValueError, match="heads must be head indices"):  # before: "'float' object is not iterable"
        zoo.attention_maps(model, images, heads=1.0)


def test_token_ids_of_any_integer_dtype_act_as_int64():
    """uint8 / int16 token ids (compact storage) give the logits of the same ids as int64, for
    GPT and seq2seq alike (an embedding takes only int64 / int32: they are widened first)."""
    gpt, seq2seq = _gpt(), _seq2seq()
    ids = torch.tensor([[1, 5, 7], [2, 3, 4]])
    with kernels.reference_only():
        expected_gpt = gpt(ids)
        expected_s2s = seq2seq(ids, ids)
        for dtype in (torch.uint8, torch.int16):
            torch.testing.assert_close(gpt(ids.to(dtype)), expected_gpt, rtol=0, atol=0)
            torch.testing.assert_close(seq2seq(ids.to(dtype), ids.to(dtype)), expected_s2s, rtol=0, atol=0)
        assert torch.equal(gpt.generate(ids.to(torch.int16), max_new_tokens=2), gpt.generate(ids, max_new_tokens=2))


@pytest.mark.parametrize("features, match", [
    (torch.randn(2, 5, 7), r"features must have shape \(B, tokens, 64\)"),  # another width
    (torch.randn(2, 64), r"features must have shape \(B, tokens, 64\)"),  # pooled already
    (torch.randn(2, 0, 64), "features hold 0 tokens; global_pool='avg' needs at least 1"),  # mean of none: NaN
])
def test_vit_forward_head_names_bad_features(features, match):
    model = zoo.create_model("vit_digits").eval()
    assert model.cfg.global_pool == "avg" and model.num_prefix_tokens == 0  # what the messages assume
    with kernels.reference_only(), pytest.raises(ValueError, match=match):
        model.forward_head(features)
    # The features forward_features makes are taken, with the logits of the whole model.
    images = torch.randn(2, 1, 8, 8)
    with kernels.reference_only():
        torch.testing.assert_close(model.forward_head(model.forward_features(images)), model(images))


def test_backbone_inputs_are_checked_by_name():
    """Before: sinusoidal positions read position -1 as the table's last row (a wrong answer, no
    error), learned ones raised an IndexError, an odd width for sinusoidal positions passed the
    config, and a wrong width or memory failed deep in a matmul."""
    T = zoo.TransformerConfig
    with pytest.raises(ValueError, match=r"positions='sinusoidal' needs an even dim .*got dim=33"):
        T(dim=33, heads=3, positions="sinusoidal")
    for positions in ("sinusoidal", "learned"):
        model = zoo.Transformer(T(dim=16, depth=1, heads=2, positions=positions, max_seq_len=8)).eval()
        x = torch.randn(1, 3, 16)
        with pytest.raises(ValueError, match=r"position_ids must be >= 0, got -1"):
            model(x, position_ids=torch.tensor([[-1, 0, 1]]))
        with pytest.raises(TypeError, match=r"position_ids must be an integer tensor, got torch.float32"):
            model(x, position_ids=torch.tensor([[0.0, 1.0, 2.0]]))
        with pytest.raises(ValueError, match=r"position_ids must have shape \(batch, seq\) = \(1, 3\), got \(3,\)"):
            model(x, position_ids=torch.arange(3))
        with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, dim\) = \(B, S, 16\), got \(1, 3, 15\)"):
            model(torch.randn(1, 3, 15))
    cross = zoo.Transformer(T(dim=16, depth=1, heads=2, cross_attention=True)).eval()
    with pytest.raises(ValueError, match=r"memory must have shape \(batch, memory_len, dim\) = \(B, Sm, 16\)"):
        cross(torch.randn(1, 3, 16), memory=torch.randn(1, 2, 8))
