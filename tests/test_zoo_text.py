"""Text front-ends against Hugging Face: BERT and GPT-2 parity, generation, presets, bad inputs.

The oracle is transformers' own model of the same architecture, randomly initialized
(nothing is downloaded) and imported with zoo.weights.from_hf. Weights are redrawn at
a larger scale than the 0.02 init so that logits are O(1) and a wrong mapping or mask
cannot hide under tiny activations.
"""

import re

import pytest
import torch
import transformers

import kernels
import zoo.text  # noqa: F401  (registers the presets)
import zoo.weights
from zoo.generation import choose_tokens, top_k_filter, top_p_filter
from zoo.registry import create_model

# The kernels' PyTorch path, except tests named "...interpreter..." (conftest.reference_attention).
pytestmark = pytest.mark.usefixtures("reference_attention")

TOL = 1e-4
BACKENDS = ["eager", "sdpa", "triton"]  # triton: the kernels' PyTorch path, inside reference_only

BERT_CONFIGS = {
    "2x32_4heads_gelu": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=40),
    "1x48_3heads_tanhgelu": dict(vocab_size=50, hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                                 intermediate_size=80, max_position_embeddings=24, hidden_act="gelu_new",
                                 type_vocab_size=3, layer_norm_eps=1e-5),
    "3x64_8heads_relu": dict(vocab_size=64, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                             intermediate_size=96, max_position_embeddings=32, hidden_act="relu"),
}
GPT2_CONFIGS = {
    "2x32_4heads": dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=40),
    "3x48_6heads_gelu_inner100": dict(vocab_size=80, n_embd=48, n_layer=3, n_head=6, n_positions=48, n_inner=100,
                                      activation_function="gelu", layer_norm_epsilon=1e-6),
    "1x64_2heads_relu": dict(vocab_size=50, n_embd=64, n_layer=1, n_head=2, n_positions=32,
                             activation_function="relu"),
}


def randomize(model: torch.nn.Module, scale: float = 0.3, position_scale: float = 1.0) -> torch.nn.Module:
    """Redraws every parameter: norm gains around 1, everything else N(0, scale^2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and ("LayerNorm" in name or ".ln_" in name or name.startswith("ln_")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "position" in name or "wpe" in name:
                p.normal_(0, position_scale)
            else:
                p.normal_(0, scale)
    return model.eval()


def hf_bert(cls=transformers.BertForMaskedLM, **config):
    return randomize(cls(transformers.BertConfig(**config)))


def hf_gpt2(**config):
    # No bos/eos: HF's generate would otherwise stop at GPT-2's 50256 behind our backs.
    config = dict(bos_token_id=None, eos_token_id=None, **config)
    return randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)))


def left_padded(vocab, lengths, seed=0):
    """Token ids (B, max(lengths)) left-padded with a nonzero id, the mask (1 = real) and positions."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), S), generator=g)
    mask = (torch.arange(S) >= S - torch.tensor(lengths)[:, None]).long()
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return ids, mask, positions


def n_params(model):
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


# --------------------------------------------------------------------------------------
# BERT parity
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BERT_CONFIGS))
def test_bert_mlm_matches_hf_with_padding(name, backend):
    config = BERT_CONFIGS[name]
    hf = hf_bert(**config)
    ours = zoo.weights.from_hf(hf, attn_backend=backend).eval()
    B, S = 3, 12
    ids = torch.randint(0, config["vocab_size"], (B, S))
    mask = (torch.arange(S) < torch.tensor([[S], [8], [3]])).long()  # right padding, as BERT batches
    types = torch.randint(0, config.get("type_vocab_size", 2), (B, S))
    labels = torch.where(torch.rand(B, S) < 0.3, ids, torch.full_like(ids, -100))
    with torch.no_grad(), kernels.reference_only():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        logits, loss = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    # Padded queries still attend to the real keys in both models, so every position is compared.
    assert (logits - expected.logits).abs().max() < TOL
    assert abs(loss - expected.loss) < TOL
    assert ours.cfg.backbone.attn_backend == backend


def test_bert_encoder_pooler_and_classifier_match_hf():
    config = BERT_CONFIGS["2x32_4heads_gelu"]
    ids = torch.randint(0, config["vocab_size"], (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    hf = hf_bert(transformers.BertModel, **config)
    ours = zoo.weights.from_hf(hf).eval()
    assert ours.mlm is None and ours.pooler is not None
    with torch.no_grad(), kernels.reference_only():
        expected = hf(input_ids=ids, attention_mask=mask)
        hidden = ours.forward_features(ids, attention_mask=mask)
        pooled = ours(ids, attention_mask=mask)
    assert (hidden - expected.last_hidden_state).abs().max() < TOL
    assert (pooled - expected.pooler_output).abs().max() < TOL

    hf = hf_bert(transformers.BertForSequenceClassification, num_labels=3, **config)
    ours = zoo.weights.from_hf(hf).eval()
    labels = torch.tensor([2, 0])
    with torch.no_grad(), kernels.reference_only():
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels)
        logits, loss = ours(ids, attention_mask=mask, labels=labels)
    assert logits.shape == (2, 3)
    assert (logits - expected.logits).abs().max() < TOL and abs(loss - expected.loss) < TOL


def test_bert_import_refuses_unknown_or_missing_weights():
    config = BERT_CONFIGS["2x32_4heads_gelu"]
    hf = hf_bert(**config)
    state = dict(hf.state_dict())
    extra = dict(state, **{"cls.other_head.weight": torch.zeros(2, 32)})
    with pytest.raises(ValueError, match="cls.other_head.weight"):
        zoo.weights.from_hf(extra, config=hf.config)
    missing = {k: v for k, v in state.items() if k != "bert.encoder.layer.1.attention.self.key.bias"}
    with pytest.raises(ValueError, match="attention.self.key.bias"):
        zoo.weights.from_hf(missing, config=hf.config)
    # A plain state dict with the config as a dict also works, and old buffers are ignored by name.
    legacy = dict(state, **{"bert.embeddings.position_ids": torch.arange(40)[None]})
    ours = zoo.weights.from_hf(legacy, config=hf.config.to_dict()).eval()
    ids = torch.randint(0, config["vocab_size"], (1, 7))
    with torch.no_grad(), kernels.reference_only():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < TOL


def test_bert_pretraining_checkpoints_in_their_original_layout_import(tmp_path):
    """The classic BERT releases: LayerNorm tensors named gamma/beta (from TensorFlow) and the
    next-sentence head beside the MLM head, under config.architectures BertForMaskedLM.
    transformers loads them (renaming, and skipping the unused head); so does from_hf, naming
    the head it leaves out. Oracle: BertForMaskedLM.from_pretrained of the same folder."""
    config = BERT_CONFIGS["2x32_4heads_gelu"]
    pretraining = hf_bert(transformers.BertForPreTraining, **config)
    state = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
             for k, v in pretraining.state_dict().items()}
    assert "cls.seq_relationship.weight" in state and "bert.embeddings.LayerNorm.gamma" in state
    pretraining.config.architectures = ["BertForMaskedLM"]
    pretraining.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    ref = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    with pytest.warns(UserWarning, match=r"next-sentence-prediction head \(cls.seq_relationship.bias, "
                                         r"cls.seq_relationship.weight\)"):
        ours = zoo.weights.from_hf(str(tmp_path))
    ids = torch.randint(0, config["vocab_size"], (2, 9))
    with torch.no_grad(), kernels.reference_only():
        want = ref(input_ids=ids).logits
        assert (ours(ids) - want).abs().max() < TOL
        assert (pretraining(input_ids=ids).prediction_logits - want).abs().max() < TOL  # the folder's weights


@pytest.mark.parametrize("cls,config,message", [
    (transformers.BertForMultipleChoice, {}, "architecture BertForMultipleChoice"),
    (transformers.BertForTokenClassification, {"num_labels": 3}, "architecture BertForTokenClassification"),
    (transformers.BertForSequenceClassification, {"num_labels": 1}, "problem_type=None and num_labels=1"),
    (transformers.BertForSequenceClassification, {"num_labels": 3, "problem_type": "multi_label_classification"},
     "problem_type='multi_label_classification'"),
    (transformers.GPT2ForSequenceClassification, {}, "architecture GPT2ForSequenceClassification"),
])
def test_hf_import_refuses_heads_the_zoo_model_does_not_compute(cls, config, message, tmp_path):
    """A head the zoo model lacks, or a classifier transformers trains with another loss (MSE for
    one label, BCE for multi-label), is refused by name, from the module and from a saved folder
    (its config.architectures), rather than imported as a lookalike with a different loss."""
    base = BERT_CONFIGS["2x32_4heads_gelu"] if cls.__name__.startswith("Bert") else GPT2_CONFIGS["2x32_4heads"]
    config_cls = transformers.BertConfig if cls.__name__.startswith("Bert") else transformers.GPT2Config
    hf = cls(config_cls(**base, **config))
    hf.save_pretrained(tmp_path)
    for source in (hf, str(tmp_path)):
        with pytest.raises(ValueError, match=re.escape(message)):
            zoo.weights.from_hf(source)


def test_hf_import_keeps_the_source_mode(tmp_path):
    """from_hf gives the mode of the source module, and eval mode from a folder or a state dict
    (as from_pretrained): dropout in the imported copy would otherwise make it differ at random."""
    config = dict(BERT_CONFIGS["2x32_4heads_gelu"], hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    hf = hf_bert(**config)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, config["vocab_size"], (2, 9))
    for source in (hf, str(tmp_path), hf.state_dict()):
        ours = zoo.weights.from_hf(source, config=hf.config if isinstance(source, dict) else None)
        assert not ours.training and not any(m.training for m in ours.modules())
        with torch.no_grad(), kernels.reference_only():
            assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < TOL
    assert zoo.weights.from_hf(hf.train()).training
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIGS["2x32_4heads"])).eval()
    assert not zoo.weights.from_hf(gpt).training and zoo.weights.from_hf(gpt.train()).training


# --------------------------------------------------------------------------------------
# GPT-2 parity
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(GPT2_CONFIGS))
def test_gpt2_matches_hf_with_left_padding(name, backend):
    config = GPT2_CONFIGS[name]
    hf = hf_gpt2(**config)
    ours = zoo.weights.from_hf(hf, attn_backend=backend).eval()
    ids, mask, positions = left_padded(config["vocab_size"], [11, 7, 2])
    with torch.no_grad(), kernels.reference_only():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        logits = ours(ids, attention_mask=mask, position_ids=positions)
        # Without padding, the loss too (HF shifts labels the same way).
        full, loss = ours(ids, labels=ids)
        reference = hf(input_ids=ids, labels=ids)
    real = mask.bool()  # a padded query attends to no real key: its row is undefined in both
    assert (logits - expected)[real].abs().max() < TOL
    assert (full - reference.logits).abs().max() < TOL
    assert abs(loss - reference.loss) < TOL


def test_gpt2_gradients_match_hf():
    config = GPT2_CONFIGS["2x32_4heads"]
    hf = hf_gpt2(**config)
    ours = zoo.weights.from_hf(hf, attn_backend="triton").eval()
    ids = torch.randint(0, config["vocab_size"], (2, 9))
    with kernels.reference_only():
        ours(ids, labels=ids)[1].backward()
    hf(input_ids=ids, labels=ids).loss.backward()
    wte = hf.transformer.wte.weight.grad  # the tied head's gradient is folded in on both sides
    assert (ours.token_embed.weight.grad - wte).abs().max() < TOL
    c_attn = hf.transformer.h[1].attn.c_attn.weight.grad.t()
    assert (ours.backbone.blocks[1].attn.qkv.weight.grad - c_attn).abs().max() < TOL


def test_gpt2_import_ignores_legacy_mask_buffers_and_untied_head():
    config = GPT2_CONFIGS["2x32_4heads"]
    hf = hf_gpt2(**config)
    state = dict(hf.state_dict())
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 40, 40).tril()
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = torch.randn_like(state["transformer.wte.weight"])  # an untied head
    ours = zoo.weights.from_hf(state, config=hf.config).eval()
    assert not ours.cfg.tie_embeddings
    ids = torch.randint(0, config["vocab_size"], (2, 6))
    with torch.no_grad(), kernels.reference_only():
        hidden = hf.transformer(input_ids=ids).last_hidden_state
        assert (ours(ids) - hidden @ state["lm_head.weight"].t()).abs().max() < TOL
    with pytest.raises(ValueError, match="no place"):
        zoo.weights.from_hf(dict(state, **{"score.weight": torch.zeros(2, 32)}), config=hf.config)


def test_triton_interpreter_path(device):
    """One small BERT and GPT-2 through the Triton kernels themselves (interpreter on CPU)."""
    assert device == "cuda" or kernels.INTERPRET
    bert = hf_bert(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=16)
    ours = zoo.weights.from_hf(bert, attn_backend="triton").eval().to(device)
    ids = torch.randint(0, 40, (2, 8))
    mask = (torch.arange(8) < torch.tensor([[8], [5]])).long()
    with torch.no_grad():
        got = ours(ids.to(device), attention_mask=mask.to(device)).cpu()
        assert (got - bert(input_ids=ids, attention_mask=mask).logits).abs().max() < TOL

    gpt = hf_gpt2(vocab_size=40, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    ours = zoo.weights.from_hf(gpt, attn_backend="triton").eval().to(device)
    ids, mask, positions = left_padded(40, [8, 5])
    with torch.no_grad():
        got = ours(ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)).cpu()
        expected = gpt(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert (got - expected)[mask.bool()].abs().max() < TOL


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------


@pytest.fixture
def gpt_pair():
    """A tiny random GPT-2 and its import; greedy decoding of it does not collapse to one token."""
    hf = hf_gpt2(**GPT2_CONFIGS["2x32_4heads"])
    return hf, zoo.weights.from_hf(hf, attn_backend="sdpa").eval()


def test_greedy_generate_matches_hf(gpt_pair):
    hf, ours = gpt_pair
    ids, mask, _ = left_padded(64, [9, 4, 6])
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               pad_token_id=0)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert got.shape == (3, 9 + 12)
    assert torch.equal(got, expected)
    assert len(set(got[:, 9:].flatten().tolist())) > 3  # the comparison is not of a constant sequence


def test_eos_stops_rows_like_hf(gpt_pair):
    hf, ours = gpt_pair
    ids, mask, _ = left_padded(64, [9, 4, 6])
    with torch.no_grad():
        greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
        eos = int(greedy[0, 9 + 2])  # row 0 stops at its third new token
        kw = dict(max_new_tokens=12, eos_token_id=[eos, 63], pad_token_id=1)
        got = ours.generate(ids, attention_mask=mask, **kw)
        expected = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(got, expected)
    stop = (got[0, 9:] == eos).nonzero()[0, 0]
    assert stop <= 2 and (got[0, 9 + stop + 1:] == 1).all()


def test_default_stop_token_comes_from_the_hf_config():
    """transformers' generate() stops at config.eos_token_id when the call names none; so does the import's."""
    probe = hf_gpt2(**GPT2_CONFIGS["2x32_4heads"])
    ids, mask, _ = left_padded(64, [9, 4, 6])
    with torch.no_grad():
        greedy = zoo.weights.from_hf(probe).generate(ids, attention_mask=mask, max_new_tokens=12)
    eos = int(greedy[0, 9 + 2])  # row 0 emits it as its third new token
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIGS["2x32_4heads"], eos_token_id=eos,
                                                              bos_token_id=None, pad_token_id=1))
    hf.load_state_dict(probe.state_dict())
    ours = zoo.weights.from_hf(hf.eval())
    assert ours.cfg.eos_token_id == eos
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(got, expected) and (got[0, 9 + 3:] == 1).all()
    with torch.no_grad():  # eos_token_id=[]: no stop token for this call, the config's included
        assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]), greedy)
    # An eos outside the vocabulary (GPT-2's 50256 in a tiny config) can never stop a row: none is kept.
    assert zoo.weights.from_hf(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        **GPT2_CONFIGS["2x32_4heads"]))).cfg.eos_token_id is None


def test_stop_and_pad_tokens_come_from_the_generation_config(tmp_path):
    """transformers' generate() reads its defaults from model.generation_config (a folder's
    generation_config.json), which a fine-tuned checkpoint may set apart from config.json."""
    probe = hf_gpt2(**GPT2_CONFIGS["2x32_4heads"])
    ids, mask, _ = left_padded(64, [9, 4, 6])
    with torch.no_grad():
        greedy = zoo.weights.from_hf(probe).generate(ids, attention_mask=mask, max_new_tokens=12)
    stop = int(greedy[0, 9 + 2])  # row 0 emits it as its third new token
    never = next(t for t in range(64) if t not in greedy.tolist()[0] + greedy.tolist()[1] + greedy.tolist()[2])
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIGS["2x32_4heads"], eos_token_id=never,
                                                              bos_token_id=never, pad_token_id=never))
    hf.load_state_dict(probe.state_dict())
    hf.eval().generation_config.eos_token_id = stop
    hf.generation_config.pad_token_id = 1
    hf.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        assert torch.equal(hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False),
                           expected)
        for source in (hf, str(tmp_path)):
            ours = zoo.weights.from_hf(source)
            assert (ours.cfg.eos_token_id, ours.cfg.pad_token_id) == (stop, 1)
            assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=12), expected)
    assert (expected[0, 9 + 3:] == 1).all()  # row 0 stopped at `stop`, then padded


def test_dropout_the_zoo_model_cannot_reproduce_is_named():
    """Dropout only acts in training mode: an import whose source drops where the zoo model cannot
    still converts (eval outputs are equal) but warns, naming the option."""
    import timm

    with pytest.warns(UserWarning, match=r"GPT-2 import: embd_pdrop=0.3 .* is not reproduced"):
        zoo.weights.from_hf(hf_gpt2(**GPT2_CONFIGS["2x32_4heads"], embd_pdrop=0.3, resid_pdrop=0.1))
    whisper = transformers.WhisperModel(transformers.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
        vocab_size=50, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        activation_dropout=0.2))
    with pytest.warns(UserWarning, match=r"Whisper import: activation_dropout=0.2 is not reproduced"):
        zoo.weights.from_hf(whisper)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, proj_drop_rate=0.1)
    with pytest.warns(UserWarning, match=r"timm ViT import: the MLP's dropout after its activation \(p=0.1\)"):
        zoo.from_timm(vit)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the usual checkpoints (equal rates, no inner dropout) convert silently
        zoo.weights.from_hf(hf_gpt2(**GPT2_CONFIGS["2x32_4heads"]))
        zoo.from_timm(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1))


def test_hf_stop_token_lists_and_pad_ids_outside_the_vocabulary():
    """transformers takes a list of stop tokens (any of them ends a row) and only warns on a pad id
    outside the vocabulary: the import keeps the list and drops that pad id."""
    probe = hf_gpt2(**GPT2_CONFIGS["2x32_4heads"])
    ids, mask, _ = left_padded(64, [9, 4, 6])
    with torch.no_grad():
        greedy = zoo.weights.from_hf(probe).generate(ids, attention_mask=mask, max_new_tokens=12)
    eos = [int(greedy[0, 9 + 2]), 63, 5000]  # row 0 emits the first; 5000 is outside the vocabulary
    transformers.logging.set_verbosity_error()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIGS["2x32_4heads"], eos_token_id=eos,
                                                              bos_token_id=None, pad_token_id=-1))
    hf.load_state_dict(probe.state_dict())
    ours = zoo.weights.from_hf(hf.eval())
    assert ours.cfg.eos_token_id == eos[:2] and ours.cfg.pad_token_id is None
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               eos_token_id=eos[:2], pad_token_id=eos[0])
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(got, expected)
    assert (got[0, 9 + 3:] == eos[0]).all()  # finished: pads with the first stop token


def test_stop_and_pad_tokens_outside_the_vocabulary_are_refused(gpt_pair):
    """A stop token the model cannot emit would never stop a row; a pad id past the vocabulary is no token."""
    _, ours = gpt_pair
    ids, mask, _ = left_padded(64, [9, 4, 6])
    for options, message in [(dict(eos_token_id=64), "eos_token_id holds 64, outside"),
                             (dict(eos_token_id=[3, -1]), "eos_token_id holds -1, outside"),
                             (dict(eos_token_id=3, pad_token_id=64), "pad_token_id 64 is outside"),
                             (dict(eos_token_id="3"), "must be an int or a list of ints")]:
        with pytest.raises((ValueError, TypeError), match=message):
            ours.generate(ids, attention_mask=mask, max_new_tokens=2, **options)


def test_suppressed_tokens_are_never_generated_as_in_hf(gpt_pair):
    hf, ours = gpt_pair
    ids, mask, _ = left_padded(64, [9, 4, 6])
    with torch.no_grad():
        greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
        # Ban what greedy picked first in every row, and the top half of the vocabulary.
        banned = sorted(set(greedy[:, 9].tolist()) | set(range(32, 64)))
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, suppress_tokens=banned)
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               pad_token_id=0, suppress_tokens=banned)
        sampled = ours.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=True, suppress_tokens=banned,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, expected)
    assert not torch.isin(got[:, 9:], torch.tensor(banned)).any()
    assert not torch.isin(sampled[:, 9:], torch.tensor(banned)).any()
    for bad, error in (([64], ValueError), ([-1], ValueError), ([True], TypeError), (list(range(64)), ValueError)):
        with pytest.raises(error, match="suppress_tokens"):
            ours.generate(ids, attention_mask=mask, max_new_tokens=2, suppress_tokens=bad)


def test_cached_decoding_equals_full_forward(gpt_pair):
    hf, ours = gpt_pair
    ids, mask, positions = left_padded(64, [7, 3])
    steps = torch.randint(0, 64, (2, 5))
    full_ids = torch.cat([ids, steps], 1)
    full_mask = torch.cat([mask, torch.ones_like(steps)], 1)
    full_pos = (full_mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = hf(input_ids=full_ids, attention_mask=full_mask, position_ids=full_pos).logits
        cache = ours.new_cache()
        got = [ours(ids, attention_mask=mask, position_ids=positions, cache=cache)[:, -1]]
        for t in range(steps.shape[1] - 1):
            n = ids.shape[1] + t + 1
            got.append(ours(steps[:, t:t + 1], attention_mask=full_mask[:, :n], position_ids=full_pos[:, n - 1:n],
                            cache=cache)[:, -1])
    got = torch.stack(got, 1)
    assert cache.offset == full_ids.shape[1] - 1
    assert (got - expected[:, ids.shape[1] - 1:-1]).abs().max() < TOL


@pytest.mark.parametrize("options", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8),
                                     dict(temperature=1.3, top_k=20, top_p=0.9)])
def test_sampling_draws_what_hf_draws_from_the_same_seed(gpt_pair, options):
    hf, ours = gpt_pair
    ids, mask, _ = left_padded(64, [9, 4, 6])
    hf_options = dict(dict(temperature=1.0, top_k=0, top_p=1.0), **options)  # 0 / 1.0: HF's filters off
    with torch.no_grad():
        torch.manual_seed(5)
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                               pad_token_id=0, **hf_options)
        torch.manual_seed(5)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, **options)
    assert torch.equal(got, expected)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(gpt_pair):
    _, ours = gpt_pair
    ids, mask, _ = left_padded(64, [5, 8])

    def sample(seed, **kw):
        return ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=1.5,
                             generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))
    assert torch.equal(sample(3, top_k=1), ours.generate(ids, attention_mask=mask, max_new_tokens=8))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.2, 0.15], [0.3, 0.3, 0.2, 0.1, 0.1]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))  # noqa: E731
    # Row 0 by mass: 0.5, +0.2 = 0.7, +0.15 = 0.85, +0.1 = 0.95, +0.05 = 1.
    assert kept(0.8)[0].tolist() == [False, True, False, True, True]
    assert kept(0.45)[0].tolist() == [False, True, False, False, False]
    assert kept(0.9)[0].tolist() == [False, True, True, True, True]
    assert kept(0.1)[0].tolist() == [False, True, False, False, False]  # the top token always stays
    assert kept(0.75)[1].sum() == 3  # 0.3 + 0.3 = 0.6 < 0.75 <= 0.8
    assert kept(1.0).all()
    # Dyadic probabilities are exact in float32: a set whose mass equals p is enough.
    exact = torch.tensor([[0.125, 0.5, 0.125, 0.25]]).log()
    assert torch.isfinite(top_p_filter(exact, 0.75)).tolist() == [[False, True, False, True]]


def test_top_k_and_choice_validation():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, True, False, True, False]]
    assert torch.isfinite(top_k_filter(logits, 10)).all()
    for bad in (dict(temperature=0.0), dict(top_k=0), dict(top_p=1.5), dict(top_p=0.0)):
        with pytest.raises(ValueError):
            choose_tokens(logits, do_sample=True, **bad)


def test_a_tiny_temperature_samples_the_argmax():
    """As the temperature goes to 0 sampling becomes greedy (the limit of softmax(l / T)); a
    temperature so small that l / T overflows float32 must still give the argmax, not NaN.
    Suppressed tokens (-inf) stay out."""
    logits = torch.tensor([[1.0, 5.0, 3.0, -float("inf"), 2.0], [-7.0, -9.0, -6.5, -8.0, -float("inf")]])
    for temperature in (1e-3, 1e-30, 1e-45):
        for seed in range(5):
            got = choose_tokens(logits, do_sample=True, temperature=temperature,
                                generator=torch.Generator().manual_seed(seed))
            assert got.tolist() == [1, 2]


# --------------------------------------------------------------------------------------
# Presets, parameter counts, bad inputs
# --------------------------------------------------------------------------------------


def test_preset_parameter_counts_equal_hf():
    with torch.device("meta"):
        assert n_params(create_model("bert_base")) == n_params(
            transformers.BertForMaskedLM(transformers.BertConfig())) == 109_514_298
        assert n_params(create_model("bert_base", mlm_head=False, pooler=True)) == n_params(
            transformers.BertModel(transformers.BertConfig()))
        assert n_params(create_model("bert_tiny")) == n_params(transformers.BertForMaskedLM(transformers.BertConfig(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)))
        assert n_params(create_model("gpt2")) == n_params(
            transformers.GPT2LMHeadModel(transformers.GPT2Config())) == 124_439_808
        assert n_params(create_model("gpt2_medium")) == n_params(transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16)))


def test_presets_train_step_and_backend_switch():
    model = create_model("gpt_nano", depth=1, attn_backend="sdpa")
    assert model.cfg.backbone.depth == 1 and model.cfg.vocab_size == 256
    model.set_attn_backend("eager")
    assert model.cfg.backbone.attn_backend == "eager" and model.backbone.blocks[0].attn.backend == "eager"
    ids = torch.randint(0, 256, (2, 16))
    logits, loss = model(ids, labels=ids)
    loss.backward()
    assert logits.shape == (2, 16, 256) and torch.isfinite(model.token_embed.weight.grad).all()
    # A loss near log(vocab) at init is what a uniform predictor scores.
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    bert = create_model("bert_tiny", depth=1, max_seq_len=32)
    with kernels.reference_only():
        assert bert(torch.randint(0, 30522, (2, 32))).shape == (2, 32, 30522)
    with pytest.raises(TypeError, match="hiden_size|did you mean"):
        create_model("bert_tiny", hiden_size=3)


def test_bad_inputs_raise_clear_errors():
    gpt = create_model("gpt_nano", depth=1, max_seq_len=16).eval()
    bert = create_model("bert_tiny", depth=1, max_seq_len=16, vocab_size=100).eval()
    with kernels.reference_only():
        with pytest.raises(ValueError, match="max_seq_len"):
            gpt(torch.zeros(1, 17, dtype=torch.long))
        with pytest.raises(ValueError, match="max_seq_len"):
            bert(torch.zeros(1, 17, dtype=torch.long))
        with pytest.raises(ValueError, match=r"input_ids must be in \[0, 100\)"):
            bert(torch.tensor([[1, 100]]))
        with pytest.raises(ValueError, match="input_ids"):
            gpt(torch.tensor([[-1, 2]]))
        with pytest.raises(TypeError, match="integer token ids"):
            gpt(torch.zeros(1, 4))
        with pytest.raises(ValueError, match="attention_mask must have shape"):
            bert(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))
        with pytest.raises(ValueError, match="token_type_ids"):
            bert(torch.zeros(1, 4, dtype=torch.long), token_type_ids=torch.full((1, 4), 2))
        ids = torch.ones(2, 4, dtype=torch.long)
        with pytest.raises(ValueError, match="LEFT-padded"):
            gpt.generate(ids, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
        with pytest.raises(ValueError, match="max_seq_len"):
            gpt.generate(ids, max_new_tokens=14)
        # 4 + 13 tokens: the last one is never fed back, so 16 positions are enough; it is the
        # full forward's greedy choice after the first 16.
        out = gpt.generate(ids, max_new_tokens=13)
        assert out.shape == (2, 17) and torch.equal(out[:, -1], gpt(out[:, :16])[:, -1].argmax(dim=-1))
        with pytest.raises(ValueError, match="max_new_tokens"):
            gpt.generate(ids, max_new_tokens=-1)
        with pytest.raises(ValueError, match="temperature"):
            gpt.generate(ids, do_sample=True, temperature=-1.0)
        with pytest.raises(TypeError, match="eos_token_id"):
            gpt.generate(ids, max_new_tokens=2, eos_token_id="2")


def test_vocab_logits_pads_odd_vocabularies_to_aligned_rows():
    """The padded projection (CUDA's default) equals F.linear in float64, gradients included, and
    its logits rows sit at 16-byte multiples; aligned vocabularies and pad=False are F.linear itself."""
    from zoo.layers import VOCAB_ALIGN, vocab_logits

    h = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    for V in (50, 99, 64):
        w = torch.randn(V, 12, dtype=torch.float64, requires_grad=True)
        b = torch.randn(V, dtype=torch.float64, requires_grad=True)
        out = vocab_logits(h, w, b, pad=True)
        ref = torch.nn.functional.linear(h, w, b)
        assert out.shape == ref.shape
        assert out.stride(-2) == (V if V % 8 == 0 else -(-V // VOCAB_ALIGN) * VOCAB_ALIGN)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(ref)
        for a, r in zip(torch.autograd.grad(out, (h, w, b), g), torch.autograd.grad(ref, (h, w, b), g)):
            assert a.shape == r.shape
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    assert vocab_logits(h, w, b, pad=False).stride(-2) == 64 and vocab_logits(h[0], w).is_contiguous()


@pytest.mark.parametrize("preset", ["gpt_nano", "bert_tiny", "seq2seq_tiny"])
def test_models_train_alike_with_padded_vocab_logits(preset, monkeypatch):
    """What the models do on CUDA (padded logits rows, a strided logits view downstream: the loss,
    its gradients) gives the CPU path's loss and gradients; vocabularies made odd on purpose."""
    import functools

    import zoo.layers
    import zoo.seq2seq

    vocab = {"gpt_nano": dict(vocab_size=101), "bert_tiny": dict(vocab_size=99),
             "seq2seq_tiny": dict(src_vocab_size=37, tgt_vocab_size=37)}[preset]
    model = create_model(preset, **vocab).eval()
    torch.manual_seed(1)
    V = vocab.get("vocab_size", 37)
    ids = torch.randint(0, V, (2, 9))
    labels = torch.randint(0, V, (2, 9))
    labels[0, :3] = -100

    def run():
        model.zero_grad()
        if preset == "seq2seq_tiny":
            logits, loss = model(ids, ids, labels=labels)
        else:
            logits, loss = model(ids, labels=labels)
        loss.backward()
        return logits, loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = run()
    padded_fn = functools.partial(zoo.layers.vocab_logits, pad=True)
    monkeypatch.setattr(zoo.text, "vocab_logits", padded_fn)
    monkeypatch.setattr(zoo.seq2seq, "vocab_logits", padded_fn)
    padded = run()
    assert padded[0].stride(-2) % 8 == 0 and plain[0].is_contiguous()
    torch.testing.assert_close(padded[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1], plain[1], rtol=1e-5, atol=1e-6)
    assert len(padded[2]) == len(plain[2])
    for a, b in zip(padded[2], plain[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
