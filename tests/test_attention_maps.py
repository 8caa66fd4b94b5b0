"""zoo.attention_maps and attention_rollout.

Oracles: Hugging Face's BERT, GPT-2 and ViT with output_attentions (their eager
softmax(QK^T) under their own masks), imported with zoo.weights.from_hf; for the
encoder-decoder's cross-attention, float64 math on the layer's own weights and inputs;
for rollout, its definition on hand-made maps.
"""

import pytest
import torch
import transformers

import zoo
import zoo.weights

from test_zoo_text import hf_gpt2, left_padded, randomize

pytestmark = pytest.mark.usefixtures("reference_attention")

TOL = 1e-5


def check_rows(probs: torch.Tensor, allowed: torch.Tensor) -> None:
    """Masked keys exactly 0, rows over allowed keys sum to 1 (0 where nothing is allowed)."""
    allowed = allowed.expand_as(probs)
    assert (probs[~allowed] == 0).all()
    sums = probs.sum(-1)
    expected = allowed.any(-1).float()
    torch.testing.assert_close(sums, expected, rtol=0, atol=1e-5)


def test_bert_maps_equal_hf_attentions_with_padding():
    config = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=16)
    hf = randomize(transformers.BertModel(transformers.BertConfig(attn_implementation="eager", **config),
                                          add_pooling_layer=False))
    model = zoo.weights.from_hf(hf, attn_backend="triton")
    ids = torch.randint(5, 40, (3, 10))
    mask = (torch.arange(10) < torch.tensor([[10], [6], [2]])).long()
    maps = zoo.attention_maps(model, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert list(maps) == ["backbone.blocks.0.attn", "backbone.blocks.1.attn"]
    for ours, theirs in zip(maps.values(), want):
        assert ours.shape == (3, 4, 10, 10) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)
        check_rows(ours, mask.bool()[:, None, None, :])
    assert model.backbone.blocks[0].attn.backend == "triton"  # the model's backend is left as it was


def test_gpt2_maps_equal_hf_attentions_causal_left_padded():
    config = dict(vocab_size=50, n_embd=32, n_layer=3, n_head=4, n_positions=24)
    hf = hf_gpt2(**config)
    hf.config._attn_implementation = "eager"
    model = zoo.weights.from_hf(hf, attn_backend="sdpa")
    ids, mask, positions = left_padded(50, [9, 4])
    maps = zoo.attention_maps(model, {"input_ids": ids, "attention_mask": mask, "position_ids": positions},
                              layers=[-1], heads=[3, 1])
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True).attentions
    (name, ours), = maps.items()
    assert name == "backbone.blocks.2.attn" and ours.shape == (2, 2, 9, 9)
    real = mask.bool()
    # A left-padding query sees no real key: its row is all zeros here, undefined in HF.
    torch.testing.assert_close(ours[real[:, None, :, None].expand_as(ours)].view(-1),
                               want[-1][:, [3, 1]][real[:, None, :, None].expand_as(ours)].view(-1), rtol=0, atol=TOL)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    check_rows(ours, causal[None, None] & real[:, None, None, :])


def test_vit_maps_equal_hf_attentions():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=4, attn_implementation="eager")
    hf = randomize(transformers.ViTModel(cfg, add_pooling_layer=False))
    model = zoo.weights.from_hf(hf)
    x = torch.randn(2, 3, 16, 16)
    maps = zoo.attention_maps(model, x, layers=["backbone.blocks.1.*"])
    with torch.no_grad():
        want = hf(pixel_values=x, output_attentions=True).attentions[1]
    torch.testing.assert_close(maps["backbone.blocks.1.attn"], want, rtol=0, atol=TOL)


def test_seq2seq_cross_attention_equals_float64_math():
    model = zoo.create_model("seq2seq_tiny", src_vocab_size=30, tgt_vocab_size=30).eval()
    src = torch.randint(5, 30, (2, 7))
    src_mask = torch.arange(7) < torch.tensor([[7], [3]])
    tgt = torch.randint(5, 30, (2, 5))
    layer = model.decoder.blocks[1].cross_attn
    seen = {}
    handle = layer.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0], memory=kwargs["memory"]),
                                             with_kwargs=True)
    maps = zoo.attention_maps(model, (src, tgt, src_mask), layers=["decoder.blocks.1.cross_attn"])
    handle.remove()
    probs = maps["decoder.blocks.1.cross_attn"]
    H, D = layer.heads, layer.head_dim
    x, memory = seen["x"].double(), seen["memory"].double()
    q = (x @ layer.q.weight.double().T + layer.q.bias.double()).view(2, 5, H, D).transpose(1, 2)
    k = (memory @ layer.kv.weight.double().T + layer.kv.bias.double()).view(2, 7, 2, H, D)[:, :, 0].transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / D ** 0.5
    want = scores.masked_fill(~src_mask[:, None, None, :], float("-inf")).softmax(-1)
    assert probs.shape == (2, H, 5, 7)
    torch.testing.assert_close(probs.double(), want, rtol=0, atol=1e-5)
    check_rows(probs, src_mask[:, None, None, :])


def test_layer_index_selects_that_block_in_every_stack():
    model = zoo.create_model("seq2seq_tiny", src_vocab_size=30, tgt_vocab_size=30)
    src, tgt = torch.randint(5, 30, (1, 4)), torch.randint(5, 30, (1, 3))
    maps = zoo.attention_maps(model, (src, tgt), layers=[0])
    assert list(maps) == ["encoder.blocks.0.attn", "decoder.blocks.0.attn", "decoder.blocks.0.cross_attn"]
    assert maps["decoder.blocks.0.cross_attn"].shape[-2:] == (3, 4)
    assert model.training  # mode restored
    assert all(not m.keep_probs and m.last_probs is None for m in zoo.attention_layers(model).values())


def test_speech_maps_mask_padded_frames():
    model = zoo.create_model("speech_tiny", num_classes=5)
    audio = torch.randn(2, 16000)
    lengths = torch.tensor([16000, 6000])
    probs = zoo.attention_maps(model, (audio, lengths), layers=[0])["backbone.blocks.0.attn"]
    frames = probs.shape[-1]
    real = probs[0].sum(-2)[0] > 0  # frames some query attends to
    assert real.all()
    valid = probs[1, 0, 0] > 0
    n_valid = int(valid.sum())
    assert 0 < n_valid < frames and valid[:n_valid].all()  # padding frames at the end are exactly 0
    check_rows(probs[1:], valid[None, None, None, :])


def test_bad_selections_raise_clear_errors():
    model = zoo.create_model("gpt_nano")
    ids = torch.randint(0, 10, (1, 4))
    with pytest.raises(ValueError, match="out of range"):
        zoo.attention_maps(model, ids, layers=[9])
    with pytest.raises(ValueError, match="matches 'encoder"):
        zoo.attention_maps(model, ids, layers=["encoder.*"])
    with pytest.raises(ValueError, match="heads"):
        zoo.attention_maps(model, ids, heads=[7])
    with pytest.raises(ValueError, match="no zoo attention layers"):
        zoo.attention_maps(torch.nn.Linear(2, 2), torch.randn(1, 2))
    with pytest.raises(ValueError, match="selects no attention module"):
        zoo.attention_maps(model, ids, layers=[], heads=[0])
    for heads in ([], [True], [1.0], ["0"]):
        with pytest.raises(ValueError, match="heads must"):
            zoo.attention_maps(model, ids, heads=heads)


def test_heads_take_one_index_or_numpy_indices():
    import numpy as np

    model = zoo.create_model("gpt_nano").eval()
    ids = torch.randint(0, 10, (1, 4))
    every = zoo.attention_maps(model, ids, layers=[0])["backbone.blocks.0.attn"]
    for heads in (1, np.int64(1), [np.int64(1)], torch.tensor(1), [-3]):
        got = zoo.attention_maps(model, ids, layers=[0], heads=heads)["backbone.blocks.0.attn"]
        assert torch.equal(got, every[:, 1:2]), heads


def test_each_module_keeps_its_own_mode():
    """A model training with one block frozen in eval mode gets that block back in eval mode."""
    model = zoo.create_model("gpt_nano").train()
    model.backbone.blocks[0].eval()
    modes = {name: module.training for name, module in model.named_modules()}
    zoo.attention_maps(model, torch.randint(0, 10, (1, 4)))
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert model.training and not model.backbone.blocks[0].training


def test_heads_are_checked_against_the_selected_layers():
    """Encoder 4 heads, decoder 8: head 5 exists in the decoder's layers only."""
    base = zoo.create_model("seq2seq_tiny", src_vocab_size=30, tgt_vocab_size=30).cfg
    model = zoo.create_model("seq2seq_tiny", src_vocab_size=30, tgt_vocab_size=30,
                             decoder=base.decoder.replace(heads=8)).eval()
    inputs = {"src_ids": torch.randint(3, 30, (1, 5)), "tgt_ids": torch.randint(3, 30, (1, 4))}
    maps = zoo.attention_maps(model, inputs, layers=["decoder.*"], heads=[5])
    assert maps and all(probs.shape[1] == 1 for probs in maps.values())
    with pytest.raises(ValueError, match=r"heads must be .* in \[0, 4\) \(the fewest heads of the selected layers\)"):
        zoo.attention_maps(model, inputs, heads=[5])


def test_rollout_definition():
    torch.manual_seed(0)
    maps = [torch.randn(2, 3, 5, 5).softmax(-1) for _ in range(3)]
    eye = torch.eye(5, dtype=torch.float64)
    expected = eye.expand(2, 5, 5)
    for probs in maps:
        a = 0.5 * probs.double().mean(1) + 0.5 * eye
        expected = (a / a.sum(-1, keepdim=True)) @ expected
    rollout = zoo.attention_rollout(maps)
    torch.testing.assert_close(rollout.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(zoo.attention_rollout(maps, residual=1.0), torch.eye(5).expand(2, 5, 5))
    with pytest.raises(ValueError, match="square"):
        zoo.attention_rollout([torch.rand(1, 1, 2, 3)])
    with pytest.raises(ValueError, match=r"sequence \(list\) of per-layer .* a tensor of shape \(2, 3, 5, 5\)"):
        zoo.attention_rollout(maps[0])
    with pytest.raises(ValueError, match=r"batch and tokens \(2, 5\), got \(1, 5\) at layer 1"):
        zoo.attention_rollout([maps[0], maps[1][:1]])


@pytest.mark.parametrize("residual", [0.0, 0.5])
def test_rollout_of_a_left_padded_sequence_is_defined_at_every_residual(residual):
    """A causal model's padded queries attend to nothing (zero rows): they carry only their own
    token, so the real tokens' rows are the rollout of the real tokens' block (no NaN at
    residual 0). Oracle: that block's rollout by the definition, in float64."""
    torch.manual_seed(0)
    model = zoo.create_model("gpt_nano", depth=2).eval()
    ids = torch.randint(0, 100, (1, 6))
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    maps = list(zoo.attention_maps(model, {"input_ids": padded, "attention_mask": mask}).values())
    assert (maps[0][0, :, :2] == 0).all() and (maps[0][0, :, :, :2] == 0).all()  # padded queries and keys
    eye = torch.eye(6, dtype=torch.float64)
    expected = eye[None]
    for probs in (m[:, :, 2:, 2:] for m in maps):
        a = (1 - residual) * probs.double().mean(1) + residual * eye
        expected = (a / a.sum(-1, keepdim=True)) @ expected
    rollout = zoo.attention_rollout(maps, residual=residual)
    assert not rollout.isnan().any()
    torch.testing.assert_close(rollout[:, 2:, 2:].double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(rollout[0, :2], torch.eye(8)[:2])
