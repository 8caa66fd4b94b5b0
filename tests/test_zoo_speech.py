"""Speech encoder: Whisper import parity, the log-mel front end, SpecAugment, padding, heads.

Oracles: Hugging Face's Whisper encoder and feature extractor, torchaudio's
MelSpectrogram, each utterance run alone, and CTC's probability summed over every
alignment by brute force.
"""

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torchaudio
import transformers

from zoo.config import TransformerConfig
from zoo.registry import create_model
from zoo.speech import SpeechConfig, SpeechCTC, SpeechEncoder, speech_model  # also registers the presets
from zoo.weights import from_hf

transformers.logging.set_verbosity_error()


pytestmark = pytest.mark.usefixtures("reference_attention")


def whisper_config(**kw) -> transformers.WhisperConfig:
    values = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=16,
                  max_source_positions=20, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                  max_target_positions=16, vocab_size=50, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  decoder_start_token_id=1)
    values.update(kw)
    return transformers.WhisperConfig(**values)


def randomized(model):
    """Every weight random and O(1) in effect (LayerNorm scales and biases included), so a
    swapped or dropped tensor in the import changes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:
                continue
            if p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p) + (1.0 if "layer_norm" in name and name.endswith("weight") else 0.0))
            else:
                p.normal_(std=p[0].numel() ** -0.5)
    return model.eval()


CONFIGS = [
    dict(),
    dict(d_model=48, encoder_layers=3, encoder_attention_heads=3, encoder_ffn_dim=96, num_mel_bins=24,
         max_source_positions=12, activation_function="gelu_new"),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=["gelu", "gelu_new-3heads"])
def test_whisper_encoder_parity(kw):
    hf = randomized(transformers.WhisperModel(whisper_config(**kw)))
    cfg = hf.config
    features = torch.randn(2, cfg.num_mel_bins, 2 * cfg.max_source_positions)
    with torch.no_grad():
        expected = hf.get_encoder()(features).last_hidden_state
        model = from_hf(hf).eval()
        assert isinstance(model, SpeechEncoder)
        for backend in ("eager", "sdpa", "triton"):
            model.set_attn_backend(backend)
            assert (model(features) - expected).abs().max() < 1e-4, backend


def test_whisper_import_from_other_state_dict_layouts():
    hf = randomized(transformers.WhisperForConditionalGeneration(whisper_config()))
    features = torch.randn(1, 16, 40)
    with torch.no_grad():
        expected = hf.get_encoder()(features).last_hidden_state
        # model.encoder.* (+ decoder and proj_out, skipped), from a state dict and the config's dict
        from_state = from_hf(hf.state_dict(), config=hf.config.to_dict(), attn_backend="sdpa").eval()
        assert (from_state(features) - expected).abs().max() < 1e-4
        bare = from_hf(hf.get_encoder()).eval()  # a WhisperEncoder: no prefix
        assert (bare(features) - expected).abs().max() < 1e-4
        kws = from_hf(hf, num_classes=5).eval()  # an encoder with a fresh classification head
        assert (kws.forward_features(features) - expected).abs().max() < 1e-4
        assert kws(features).shape == (1, 5)
    state = dict(hf.state_dict(), **{"model.encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="extra"):
        from_hf(state, config=hf.config)


def test_whisper_parity_through_the_triton_interpreter():
    hf = randomized(transformers.WhisperModel(whisper_config(d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                                             num_mel_bins=8, max_source_positions=8)))
    features = torch.randn(1, 8, 16)
    with torch.no_grad():
        expected = hf.get_encoder()(features).last_hidden_state
        model = from_hf(hf).eval()  # attn_backend "triton": the interpreted kernels on CPU
        assert model.cfg.backbone.attn_backend == "triton"
        assert (model(features) - expected).abs().max() < 1e-4


def test_log_mel_matches_whisper_feature_extractor_with_padding():
    extractor = transformers.WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160,
                                                     chunk_length=30, n_fft=400)
    model = create_model("whisper_tiny_encoder", depth=1)
    lengths = [16000, 9000]
    waves = 0.1 * torch.randn(2, 16000)
    noisy = waves.clone()
    noisy[1, 9000:] = 5 * torch.randn(7000)  # whatever the collator put there
    log_mel, frames = model.log_mels(noisy, lengths)
    assert frames.tolist() == [100, math.ceil(9000 / 160)]
    for row, n in enumerate(lengths):
        silent = torch.zeros(16000)
        silent[:n] = waves[row, :n]
        expected = extractor(silent.numpy(), sampling_rate=16000, return_tensors="pt",
                             padding="longest").input_features[0]
        assert expected.shape == (80, 100)
        valid = int(frames[row])
        assert (log_mel[row, :, :valid] - expected[:, :valid]).abs().max() < 1e-4


def test_log_mel_matches_torchaudio_melspectrogram():
    cfg = SpeechConfig(n_mels=40, mel_scale="htk", mel_norm="log", backbone=TransformerConfig(dim=32, heads=2,
                                                                                             positions="sinusoidal"))
    model = SpeechEncoder(cfg)
    wave = 0.1 * torch.randn(3, 8000)
    reference = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=400, hop_length=160, n_mels=40)
    expected = reference.double()(wave.double())[..., :-1].clamp(min=1e-10).log()
    log_mel, frames = model.log_mels(wave)
    assert frames is None and log_mel.shape == (3, 40, 50)
    assert (log_mel.double() - expected).abs().max() < 1e-4


def test_spec_augment_only_while_training():
    model = create_model("speech_tiny")
    x = torch.rand(4, 40, 100) + 1.0  # no natural zeros
    model.eval()
    assert torch.equal(model.spec_augment(x), x)
    model.train()
    masked = model.spec_augment(x)
    changed = masked != x
    assert changed.any()
    for row in range(4):
        zero_bins = (masked[row] == 0).all(dim=1)  # whole mel rows
        zero_frames = (masked[row] == 0).all(dim=0)  # whole time columns
        covered = zero_bins[:, None] | zero_frames[None, :]
        assert torch.equal(changed[row], covered)
        assert int(zero_bins.sum()) <= 2 * 7 and int(zero_frames.sum()) <= 2 * 9  # widths below 8 and 10
    assert not all(torch.equal(changed[0], changed[r]) for r in range(1, 4))  # iid across the batch
    wave = 0.1 * torch.randn(2, 16000)
    with torch.no_grad():
        model.eval()
        evaluated = model(wave)
        model.train()  # dropout is 0: only SpecAugment makes training differ
        assert not torch.allclose(model(wave), evaluated)


def test_spec_augment_masks_each_utterance_within_its_own_frames():
    """Time masks fall inside each utterance's frames, and where they fall does not depend on
    how far the batch is padded; widths follow torchaudio's law (uniform in [0, width))."""
    model = create_model("speech_tiny").train()  # 2 frequency masks below 8 bins, 2 time masks below 10 frames
    frames = torch.tensor([100, 23, 57, 9])
    masked = []
    for total in (100, 160):
        x = torch.rand(4, 40, total) + 1.0  # no natural zeros
        torch.manual_seed(0)
        out = model.spec_augment(x, frames)
        zero_frames = (out == 0).all(dim=1)  # (B, total): whole time columns
        for row, n in enumerate(frames.tolist()):
            assert not zero_frames[row, n:].any(), "a time mask fell into the padding"
            assert int(zero_frames[row].sum()) <= 2 * 9
        masked.append(out[..., :100] == 0)
    assert torch.equal(masked[0], masked[1])

    # One mask per utterance: a 20-frame utterance padded to 200 frames is masked as much as
    # one alone, E[width] = (10 - 1) / 2; torchaudio's draw over the padded length puts most
    # of its masks in the padding.
    model.cfg = dataclasses.replace(model.cfg, freq_masks=0, time_masks=1)
    torch.manual_seed(1)
    rows = 4000
    out = model.spec_augment(torch.ones(rows, 40, 200), torch.full((rows,), 20))
    widths = (out == 0).all(dim=1).sum(dim=1).double()
    assert abs(widths.mean().item() - 4.5) < 0.3  # standard error 0.045
    assert widths.max() == 9 and widths.min() == 0


def test_padding_content_does_not_change_valid_outputs():
    model = create_model("speech_tiny", num_classes=0).eval()  # the bare encoder
    lengths = torch.tensor([16000, 9000, 12345])
    waves = 0.1 * torch.randn(3, 16000)
    zero_pad = waves * (torch.arange(16000) < lengths[:, None])
    noise_pad = torch.where(torch.arange(16000) < lengths[:, None], waves, torch.randn(3, 16000))
    with torch.no_grad():
        states, mask = model.encode(zero_pad, lengths)
        noisy, _ = model.encode(noise_pad, lengths)
    positions = [math.ceil(math.ceil(n / 160) / 2) for n in lengths.tolist()]
    assert mask.sum(dim=1).tolist() == positions
    for row, n in enumerate(positions):
        assert torch.allclose(states[row, :n], noisy[row, :n], atol=1e-5)


def test_padding_of_inf_or_nan_does_not_reach_valid_outputs():
    """Padding may hold -inf (the log of silence) or NaN: valid states equal those of zero padding."""
    model = create_model("speech_tiny", num_classes=0).eval()
    for inputs, lengths in ((torch.randn(2, 40, 30), [30, 17]), (0.1 * torch.randn(2, 4000), [4000, 2345])):
        valid = torch.arange(inputs.shape[-1]) < torch.tensor(lengths)[:, None]
        valid = valid[:, None, :] if inputs.dim() == 3 else valid
        with torch.no_grad():
            expected, mask = model.encode(inputs.masked_fill(~valid, 0.0), lengths)
            for fill in (-math.inf, math.nan):
                states, _ = model.encode(inputs.masked_fill(~valid, fill), lengths)
                assert torch.isfinite(states[mask]).all(), fill
                torch.testing.assert_close(states[mask], expected[mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize("samples", [3201, 2450, 2400])
def test_a_clip_has_as_many_frames_alone_as_in_a_batch(samples):
    """frames() counts the frames whose center is a sample; the clip alone has that many too
    (the STFT's last frame is dropped only when the length is a multiple of the hop)."""
    model = create_model("speech_tiny", num_classes=0).eval()
    wave = 0.1 * torch.randn(1, samples)
    batch = torch.cat([wave, torch.zeros(1, 4000 - samples)], dim=1)
    batch = torch.cat([batch, 0.1 * torch.randn(1, 4000)])
    alone, frames_alone = model.log_mels(wave)
    padded, frames = model.log_mels(batch, [samples, 4000])
    assert frames_alone is None and alone.shape[-1] == math.ceil(samples / 160) == int(frames[0])
    assert padded.shape[-1] == 25 and int(frames[1]) == 25
    # Frames whose window stays inside the clip are equal; the last ones differ only by what
    # lies past the end (reflect padding alone, silence in the batch).
    inside = (samples - 200) // 160 + 1
    torch.testing.assert_close(padded[0, :, :inside], alone[0, :, :inside], rtol=0, atol=1e-4)
    with torch.no_grad():
        assert model(wave).shape[1] == int(model.encode(batch, [samples, 4000])[1][0].sum())


def test_padded_log_mels_match_each_utterance_alone():
    model = create_model("speech_tiny", num_classes=0).eval()
    frames = [60, 37, 24]
    mels = torch.randn(3, 40, 60)
    padded = mels.clone()
    for row, n in enumerate(frames):
        padded[row, :, n:] = 10 * torch.randn(40, 60 - n)
    with torch.no_grad():
        batched = model(padded, frames)
        for row, n in enumerate(frames):
            alone = model(mels[row:row + 1, :, :n])
            assert alone.shape[1] == math.ceil(n / 2)
            assert torch.allclose(batched[row, : alone.shape[1]], alone[0], atol=1e-5)


def test_ctc_loss_equals_the_sum_over_all_alignments():
    model = speech_model(SpeechConfig(n_mels=8, vocab_size=3, backbone=TransformerConfig(
        dim=16, depth=1, heads=2, positions="sinusoidal", max_seq_len=16))).eval()
    assert isinstance(model, SpeechCTC)
    mels = torch.randn(2, 8, 10)
    frame_lengths = [10, 6]  # -> 5 and 3 positions
    targets = torch.tensor([[1, 2], [2, 0]])
    target_lengths = [2, 1]
    with torch.no_grad():
        loss = model.ctc_loss(mels, frame_lengths, targets, target_lengths)
        log_probs = F.log_softmax(model(mels, frame_lengths).double(), dim=-1)
    per_utterance = []
    for row, (frames, length) in enumerate(zip(frame_lengths, target_lengths)):
        positions = (frames + 1) // 2
        target = targets[row, :length].tolist()
        total = 0.0
        for path in itertools.product(range(3), repeat=positions):
            collapsed = [s for i, s in enumerate(path) if s != 0 and (i == 0 or s != path[i - 1])]
            if collapsed == target:
                total += math.exp(sum(float(log_probs[row, t, s]) for t, s in enumerate(path)))
        per_utterance.append(-math.log(total) / length)  # 'mean' divides by target length
    assert abs(float(loss) - sum(per_utterance) / 2) < 1e-4


def test_ctc_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = create_model("speech_tiny", num_classes=0, vocab_size=5, freq_masks=0, time_masks=0).train()
    waves = 0.1 * torch.randn(2, 8000)
    lengths = [8000, 6000]
    targets = torch.tensor([[1, 2, 3], [4, 2, 0]])
    target_lengths = [3, 2]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = model.ctc_loss(waves, lengths, targets, target_lengths)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    assert model.greedy_decode(waves, lengths) == [[1, 2, 3], [4, 2]]


def test_keyword_classifier_trains_on_variable_length_audio():
    model = create_model("speech_tiny").train()
    waves = 0.1 * torch.randn(3, 16000)
    lengths = [16000, 8000, 12000]
    logits = model(waves, lengths)
    assert logits.shape == (3, 12)
    F.cross_entropy(logits, torch.tensor([0, 5, 11])).backward()
    for p in (model.head.weight, model.conv1.weight, model.backbone.blocks[0].attn.qkv.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        noisy = waves.clone()
        noisy[1, 8000:] = torch.randn(8000)
        assert torch.allclose(model(waves, lengths), model(noisy, lengths), atol=1e-5)


@pytest.mark.parametrize("name, dims", [("whisper_tiny_encoder", (384, 4, 6, 1536)),
                                        ("whisper_base_encoder", (512, 6, 8, 2048))])
def test_whisper_preset_parameter_counts(name, dims):
    d, layers, heads, ffn = dims
    model = create_model(name)
    hf = transformers.models.whisper.modeling_whisper.WhisperEncoder(whisper_config(
        d_model=d, encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=ffn, num_mel_bins=80,
        max_source_positions=1500))
    hf_count = sum(p.numel() for p in hf.parameters())
    # HF keeps the fixed sinusoids as a (frozen) parameter, ours as a buffer; our fused
    # qkv has a key bias that Whisper lacks (zero on import).
    assert sum(p.numel() for p in model.parameters()) == hf_count - 1500 * d + layers * d
    assert model.backbone.pos_table.shape == (1500, d) and model.cfg.n_mels == 80


def test_bad_inputs():
    model = create_model("speech_tiny").eval()
    with pytest.raises(TypeError, match="float"):
        model(torch.zeros(1, 16000, dtype=torch.long))
    with pytest.raises(ValueError, match="log-mels"):
        model(torch.zeros(1, 7, 100))
    with pytest.raises(ValueError, match="lengths"):
        model(torch.zeros(2, 16000), [16000, 17000])
    limit = model.backbone.cfg.max_seq_len  # positions; two frames each (the stride-2 convolution)
    model(torch.zeros(1, 40, 2 * limit))
    with pytest.raises(ValueError, match=rf"{2 * limit + 1} mel frames make {limit + 1} positions .* at most "
                                         rf"{2 * limit} frames, {2 * limit * 0.01:g} s of audio"):
        model(torch.zeros(1, 40, 2 * limit + 1))
    with pytest.raises(ValueError, match="samples"):
        model(torch.zeros(1, 100))
    with pytest.raises(ValueError, match="not both"):
        create_model("speech_tiny", vocab_size=5)
    with pytest.raises(TypeError, match="n_mels"):
        create_model("speech_tiny", n_mel=80)


@pytest.mark.parametrize("preset", ["speech_tiny", "whisper_tiny_encoder"])
def test_builds_on_the_meta_device(preset):
    """`with torch.device("meta")` builds the model without memory (to count or shard it):
    the same parameters and buffers, by name and shape, as the model built on the CPU, whose
    filter bank is computed there."""
    with torch.device("meta"):
        on_meta = create_model(preset)
    on_cpu = create_model(preset)
    for kind in ("named_parameters", "named_buffers"):
        meta_shapes = {n: t.shape for n, t in getattr(on_meta, kind)()}
        assert meta_shapes == {n: t.shape for n, t in getattr(on_cpu, kind)()}
        assert all(t.device.type == "meta" for _, t in getattr(on_meta, kind)())
