"""Speech tasks and data: espeak-ng synthesis, the voice split, batching, KWS and CTC tasks, bad paths.

Oracles: espeak-ng's own WAV files read with the wave module (sample counts and rates),
set disjointness for the voice split, the items themselves for batching, an edit
distance computed here for CER/WER, and the file names for errors.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import wave

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tasks.data import speech as speech_data
from tasks.data.speech import (SAMPLE_RATE, KeywordDataModule, collate_waveforms, espeak_voices, group_alike,
                               read_audio, read_wav, split_voices, synthesize, voice_split)
from tasks.data.speech_corpora import (LIBRISPEECH_ALPHABET, LibriSpeechDataModule, SpeechCommandsDataModule,
                                       TranscriptCollate)
from tasks.data.tokenizers import CharTokenizer
from tasks.speech import AudioClassification, SpeechRecognition

pytestmark = pytest.mark.usefixtures("reference_attention")

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


def _espeak_file(tmp_path, word: str, voice: str, speed: int) -> tuple[int, int]:
    """(sample rate, frames) of espeak-ng's own WAV file for the word (-w writes a complete header)."""
    path = tmp_path / f"{word}-{speed}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), word], check=True)
    with wave.open(str(path)) as w:
        return w.getframerate(), w.getnframes()


def test_a_file_that_is_not_wav_is_named(tmp_path):
    path = tmp_path / "clip.wav"
    path.write_bytes(b"not a riff header at all")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable WAV file")):
        read_wav(str(path))


def test_an_empty_or_truncated_wav_is_named(tmp_path):
    empty, cut = tmp_path / "empty.wav", tmp_path / "cut.wav"
    _write_wav(empty, torch.zeros(0))
    _write_wav(cut, torch.full((100,), 0.1))
    cut.write_bytes(cut.read_bytes()[:-1])  # half a sample missing
    with pytest.raises(ValueError, match=re.escape(f"{empty}: the WAV file holds no samples")):
        read_wav(str(empty))
    with pytest.raises(ValueError, match=re.escape(f"{cut}: the WAV data is cut off")):
        read_wav(str(cut))


@needs_espeak
def test_synthesis_gives_16khz_audio_of_plausible_length(tmp_path):
    for speed in (120, 220):
        rate, frames = _espeak_file(tmp_path, "seven", "en-us+m3", speed)
        streamed = subprocess.run(["espeak-ng", "-v", "en-us+m3", "-s", str(speed), "--stdout", "seven"],
                                  capture_output=True, check=True).stdout
        samples, streamed_rate = read_wav(streamed)
        assert (streamed_rate, len(samples)) == (rate, frames)  # the streamed WAV decodes whole
        clip = synthesize("seven", "en-us+m3", speed=speed)
        # Resampled to 16 kHz, then silence trimmed: at most the file's length at 16 kHz.
        assert len(clip) <= math.ceil(frames * SAMPLE_RATE / rate) + 1
        assert 0.2 * SAMPLE_RATE < len(clip) < 1.2 * SAMPLE_RATE, len(clip)  # one spoken word
        assert clip.abs().max() > 0.05
    slow, fast = synthesize("seven", "en-us+m3", speed=100), synthesize("seven", "en-us+m3", speed=300)
    assert len(slow) > 1.5 * len(fast)


def test_voice_split_follows_the_shares():
    names = [f"voice{i}" for i in range(2000)]
    counts = {s: sum(voice_split(n) == s for n in names) for s in ("train", "val", "test")}
    assert abs(counts["train"] / 2000 - 0.70) < 0.05 and abs(counts["val"] / 2000 - 0.15) < 0.04


def test_alike_voices_are_grouped_by_correlation_with_single_linkage():
    base = torch.tensor([1.0, 4.0, 2.0, 8.0, 5.0, 7.0])
    envelopes = {"a": base, "b": 3 * base - 2,  # correlation 1 with a: the same voice, louder
                 "c": base + torch.tensor([0.0, 0, 0, 0, 0, 2.5]),   # close to a
                 "d": base + torch.tensor([0.0, 0, 0, 0, 4.0, 6.5]),  # close to c only
                 "e": base.flip(0), "f": torch.tensor([3.0, 1, 4, 1, 5, 9])}
    corr = torch.corrcoef(torch.stack([envelopes[n] for n in "abcdef"]).double())
    assert corr[0, 2] >= 0.9 and corr[2, 3] >= 0.9 and corr[0, 3] < 0.9  # d joins a only through c
    assert max(corr[4, :4].max(), corr[5, :5].max()) < 0.9
    assert group_alike(envelopes, 0.9) == [["a", "b", "c", "d"], ["e"], ["f"]]
    assert group_alike(envelopes, 0.999) == [["a", "b"], ["c"], ["d"], ["e"], ["f"]]


@needs_espeak
def test_variants_that_render_the_same_audio_share_a_split():
    """espeak-ng gives some variants the same voice under two names (caleb and klatt with 1.51):
    whatever the version, byte-identical audio for two words must never cross splits."""
    _, variants = espeak_voices()

    def audio(variant):
        return tuple(subprocess.run(["espeak-ng", "-v", f"en-us+{variant}", "--stdout", word], capture_output=True,
                                    check=True).stdout for word in ("seven", "left"))

    renders: dict = {}
    for variant in variants:
        renders.setdefault(audio(variant), []).append(variant)
    split_of = {v: split for split, names in split_voices(variants, workers=2).items() for v in names}
    assert sorted(split_of) == sorted(variants)
    assert all(len({split_of[v] for v in same}) == 1 for same in renders.values())
    assert all(split_of[v] for v in variants) and set(split_of.values()) == {"train", "val", "test"}


@pytest.fixture(scope="module")
def keywords(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    cache = tmp_path_factory.mktemp("keyword_cache")
    dm = KeywordDataModule(words=["yes", "no", "stop"], train_per_word=12, eval_per_word=6, cache_dir=str(cache),
                           batch_size=8)
    dm.setup("fit")
    return dm


def test_keyword_voices_are_disjoint_across_splits(keywords):
    variants = {split: {v.split("+", 1)[1] for v in keywords.clips[split]["voices"]}
                for split in ("train", "val", "test")}
    assert not variants["train"] & variants["val"]
    assert not variants["train"] & variants["test"]
    assert not variants["val"] & variants["test"]
    assert [len(keywords.clips[s]["labels"]) for s in ("train", "val", "test")] == [36, 18, 18]
    assert keywords.synthesis_seconds is not None


def test_keyword_cache_is_reused(keywords):
    again = KeywordDataModule(words=["yes", "no", "stop"], train_per_word=12, eval_per_word=6,
                              cache_dir=keywords.cache_dir)
    again.setup("fit")
    assert again.synthesis_seconds is None  # loaded, not synthesized
    assert torch.equal(again.clips["val"]["audio"], keywords.clips["val"]["audio"])
    assert torch.equal(again.dataset("val")[5][0], keywords.dataset("val")[5][0])


def test_a_corrupt_cache_file_is_named(keywords, tmp_path):
    dm = KeywordDataModule(words=["yes", "no", "stop"], train_per_word=12, eval_per_word=6, cache_dir=str(tmp_path))
    os.makedirs(tmp_path, exist_ok=True)
    with open(dm.cache_path(), "wb") as f:
        f.write(b"not a torch file")
    with pytest.raises(RuntimeError, match=os.path.basename(dm.cache_path())):
        dm.setup("fit")


def test_keyword_batches_hold_variable_lengths(keywords):
    val = keywords.dataset("val")
    assert torch.equal(val[3][0], val[3][0])  # evaluation items are fixed
    fixed = next(iter(keywords.val_dataloader()))
    assert fixed[0].shape == (8, SAMPLE_RATE) and fixed[1].tolist() == [SAMPLE_RATE] * 8

    keywords.duration = None
    try:
        variable = keywords.dataset("val")
        items = [variable[i] for i in range(8)]
    finally:
        keywords.duration = 1.0
    waveforms, lengths, labels = collate_waveforms(items)
    assert lengths.tolist() == [len(w) for w, _ in items] and len(set(lengths.tolist())) > 1
    assert waveforms.shape == (8, max(lengths.tolist()))
    for i, (w, label) in enumerate(items):
        assert torch.equal(waveforms[i, :len(w)], w) and not waveforms[i, len(w):].any()
        assert labels[i] == label


def _dominant_hz(waveform: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(waveform * torch.hann_window(len(waveform)))
    return float(spectrum.abs().argmax()) * SAMPLE_RATE / len(waveform)


def test_speed_perturbation_moves_the_pitch_within_its_range():
    # A 1 kHz tone resampled by r and played at 16 kHz sounds at 1000 / r Hz (analytic).
    tone = (0.5 * torch.sin(2 * math.pi * 1000 * torch.arange(SAMPLE_RATE // 2) / SAMPLE_RATE) * 32767)
    audio, offsets, labels = tone.to(torch.int16), torch.tensor([0, len(tone)]), torch.tensor([0])
    quiet = (200.0, 200.0)  # the noise far below the tone: the peak is the tone's
    plain = speech_data.KeywordClips(audio, offsets, labels, None, quiet, train=True)
    assert abs(_dominant_hz(plain[0][0]) - 1000) < 5  # within the FFT's 2 Hz bins
    perturbed = speech_data.KeywordClips(audio, offsets, labels, None, quiet, train=True, speed_perturb=0.2)
    peaks = [_dominant_hz(perturbed[0][0]) for _ in range(30)]
    assert all(1000 / 1.2 - 5 < f < 1000 / 0.8 + 5 for f in peaks), peaks
    assert max(peaks) - min(peaks) > 100, peaks  # 30 draws over a +-20 % range do spread
    evaluation = speech_data.KeywordClips(audio, offsets, labels, None, quiet, train=False, speed_perturb=0.2)
    assert abs(_dominant_hz(evaluation[0][0]) - 1000) < 5  # evaluation items are never perturbed
    with pytest.raises(ValueError, match="speed_perturb"):
        KeywordDataModule(speed_perturb=0.7)


def test_missing_espeak_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(speech_data.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        KeywordDataModule(cache_dir=str(tmp_path)).setup("fit")


def test_keyword_spotting_trains_a_few_steps(keywords, tmp_path):
    task = AudioClassification(model="speech_tiny", num_classes=3, lr=2e-3, warmup=2,
                               model_args={"attn_backend": "sdpa"})
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, max_steps=6, num_sanity_val_steps=0)
    trainer.fit(task, keywords)
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and 0.0 <= float(metrics["val/acc"]) <= 1.0
    assert "val/acc_top3" in metrics


class _Words(L.LightningDataModule):
    """Four synthesized words with their transcripts, as a LibriSpeech batch would hold them."""

    def __init__(self):
        super().__init__()
        self.tokenizer = CharTokenizer(LIBRISPEECH_ALPHABET)
        self.items = [(synthesize(w.lower(), "en-us+f2"), w) for w in ("YES", "NO", "GO LEFT", "STOP")]

    def val_dataloader(self):
        return DataLoader(self.items, batch_size=4, collate_fn=TranscriptCollate(self.tokenizer))


def _edits(a: list, b: list) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


@needs_espeak
def test_ctc_task_gives_finite_loss_and_error_rates(tmp_path):
    data = _Words()
    task = SpeechRecognition(model="speech_tiny", vocab_size=33, model_args={"attn_backend": "sdpa"})
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    metrics = trainer.validate(task, data, verbose=False)[0]
    assert math.isfinite(metrics["val/loss"]) and metrics["val/loss"] > 0
    batch = next(iter(data.val_dataloader()))
    assert batch["targets"][2, :batch["target_lengths"][2]].tolist() == data.tokenizer.encode("GO LEFT")
    task.eval()  # as in validation: SpecAugment off (validate() puts the module back in train mode)
    predictions = task.transcribe(batch["waveforms"], batch["lengths"])
    texts = batch["texts"]
    cer = sum(_edits(list(p), list(t)) for p, t in zip(predictions, texts)) / sum(map(len, texts))
    wer = sum(_edits(p.split(), t.split()) for p, t in zip(predictions, texts)) / sum(len(t.split()) for t in texts)
    assert metrics["val/cer"] == pytest.approx(cer, rel=1e-5)
    assert metrics["val/wer"] == pytest.approx(wer, rel=1e-5)
    # One gradient step: the loss is differentiable and the parameters move.
    loss = task._loss(batch)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)


def test_utterances_too_short_for_their_transcript_are_counted_and_do_not_poison_training():
    """CTC needs a frame per symbol and a blank between repeats. An utterance with fewer has an
    infinite loss and NaN gradients (clipping would spread them to every weight): in training it
    counts 0 and train/too_short counts it. Oracle: torch's own per-utterance CTC loss is inf
    for exactly the utterances counted."""
    torch.manual_seed(0)
    task = SpeechRecognition(model="speech_tiny", vocab_size=12, model_args={"depth": 1})
    lengths = torch.tensor([480, 480, 16000, 480])  # 3 frames -> 2 positions; 100 frames -> 50
    targets = torch.tensor([[5, 5, 0], [5, 6, 0], [5, 5, 5], [5, 6, 7]])  # "aa" needs 3 positions, "abc" 3
    batch = {"waveforms": torch.randn(4, 16000) * 0.1, "lengths": lengths, "targets": targets,
             "target_lengths": torch.tensor([2, 2, 3, 3])}
    logits, counts = task.model.frame_logits(batch["waveforms"], lengths)
    per_utterance = torch.nn.functional.ctc_loss(logits.log_softmax(-1).transpose(0, 1), targets, counts,
                                                 batch["target_lengths"], reduction="none")
    assert per_utterance.isinf().tolist() == [True, False, False, True]
    assert task.too_short(batch).item() == 2
    assert task._loss(batch).isinf()  # validation shows it
    loss = task._loss(batch, zero_infinity=True)
    loss.backward()
    assert loss.isfinite() and all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)


def _write_wav(path, samples: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((samples.clamp(-1, 1) * 32767).to(torch.int16).numpy().tobytes())


def test_speech_commands_follows_the_official_lists(tmp_path):
    folder = tmp_path / "SpeechCommands" / "speech_commands_v0.02"
    tone = torch.sin(torch.arange(SAMPLE_RATE // 2) * 0.05)
    for word in ("yes", "no", "bed"):
        for speaker in ("aaa", "bbb", "ccc"):
            _write_wav(folder / word / f"{speaker}_nohash_0.wav", tone)
    (folder / "validation_list.txt").write_text("yes/bbb_nohash_0.wav\nbed/bbb_nohash_0.wav\n")
    (folder / "testing_list.txt").write_text("no/ccc_nohash_0.wav\n")
    dm = SpeechCommandsDataModule(root=str(tmp_path), words=["yes", "no"], batch_size=4, num_workers=0)
    dm.setup("fit")
    assert dm.classes == ["yes", "no", "_unknown_"] and dm.num_classes == 3
    assert sorted(label for _, label in dm.val_set.items) == [0, 2]
    assert [label for _, label in dm.test_set.items] == [1]
    assert len(dm.train_set) == 9 - 3
    waveforms, lengths, labels = next(iter(dm.val_dataloader()))
    assert waveforms.shape == (2, SAMPLE_RATE // 2) and lengths.tolist() == [SAMPLE_RATE // 2] * 2
    everything = SpeechCommandsDataModule(root=str(tmp_path), num_workers=0)
    everything.setup("fit")
    assert everything.classes == ["bed", "no", "yes"]


def test_unknown_words_and_empty_corpora_are_refused(tmp_path):
    folder = tmp_path / "SpeechCommands" / "speech_commands_v0.02"
    folder.mkdir(parents=True)
    (folder / "validation_list.txt").write_text("")
    (folder / "testing_list.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="no word folders under"):
        SpeechCommandsDataModule(root=str(tmp_path), num_workers=0).setup("fit")
    _write_wav(folder / "yes" / "aaa_nohash_0.wav", torch.full((800,), 0.1))
    _write_wav(folder / "no" / "bbb_nohash_0.wav", torch.full((800,), 0.1))
    with pytest.raises(ValueError, match="no word 'nope' under .*its words: no, yes"):
        SpeechCommandsDataModule(root=str(tmp_path), words=["yes", "nope"], num_workers=0).setup("fit")
    with pytest.raises(ValueError, match="the validation split holds no clip"):
        SpeechCommandsDataModule(root=str(tmp_path), words=["yes", "no"], num_workers=0).setup("fit")
    libri = tmp_path / "libri" / "LibriSpeech"
    for name in ("train-clean-100", "dev-clean", "test-clean"):
        (libri / name / "19" / "198").mkdir(parents=True)  # folders, but no transcripts nor audio
    with pytest.raises(FileNotFoundError, match="LibriSpeech train-clean-100: no <speaker>/<chapter>/"):
        LibriSpeechDataModule(root=str(tmp_path / "libri")).setup("fit")


def test_the_ctc_blank_is_never_a_character_and_a_larger_head_never_reaches_the_text():
    tokenizer = CharTokenizer(LIBRISPEECH_ALPHABET)

    class _Tokenized(L.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.tokenizer = tokenizer

    for blank in (5, tokenizer.unk_id):  # " " and <unk>: symbols a transcript holds
        task = SpeechRecognition(model="speech_tiny", vocab_size=33, blank_id=blank,
                                 model_args={"attn_backend": "sdpa"})
        task.trainer = L.Trainer(accelerator="cpu", logger=False)
        task.trainer.datamodule = _Tokenized()
        with pytest.raises(ValueError, match=f"blank_id {blank} is the tokenizer's"):
            task.setup("validate")
    torch.manual_seed(0)
    task = SpeechRecognition(model="speech_tiny", vocab_size=48, model_args={"attn_backend": "sdpa"}).eval()
    waveforms, lengths = 0.1 * torch.randn(3, 8000), torch.tensor([8000, 6000, 3000])
    expected = task.transcribe(waveforms, lengths, tokenizer)
    bias = torch.zeros(48)
    bias[[*range(1, tokenizer.num_specials), *range(tokenizer.vocab_size, 48)]] = 100.0
    task.model.head.register_forward_hook(lambda module, args, out: out + bias)
    assert task.transcribe(waveforms, lengths, tokenizer) == expected
    assert any(expected)  # an untrained head says something: the comparison is not of empty strings


def test_missing_speech_folders_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_commands"):
        SpeechCommandsDataModule(root=str(tmp_path / "no_such_commands")).setup("fit")
    with pytest.raises(FileNotFoundError, match="dev-clean"):
        (tmp_path / "libri" / "LibriSpeech" / "train-clean-100").mkdir(parents=True)
        LibriSpeechDataModule(root=str(tmp_path / "libri")).setup("fit")
    with pytest.raises(FileNotFoundError, match="no_such_libri"):
        LibriSpeechDataModule(root=str(tmp_path / "no_such_libri")).setup("fit")
    with pytest.raises(FileNotFoundError, match="missing.flac"):
        read_audio(str(tmp_path / "missing.flac"))


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_a_truncated_flac_is_named(tmp_path, keep):
    """libsndfile's own errors ("flac decoder lost sync", "Internal psf_fseek() failed") name no file."""
    import soundfile

    path = tmp_path / "84-121123-0000.flac"
    soundfile.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, 16000), 16000, format="FLAC")
    samples, rate = read_audio(str(path))
    assert rate == 16000 and samples.shape == (16000,)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    message = f"{str(path)!r} cannot be decoded (truncated, corrupt or not audio)"
    with pytest.raises(ValueError, match=re.escape(message)):
        read_audio(str(path))


def test_librispeech_tokenizer_round_trips_transcripts():
    dm = LibriSpeechDataModule(root="unused")
    text = "HE HOPED THERE WOULD BE STEW FOR DINNER TURNIPS AND CARROTS AND BRUISED POTATOES'"
    ids = dm.tokenizer.encode(text)
    assert 0 not in ids and dm.tokenizer.unk_id not in ids  # never the CTC blank, never unknown
    assert dm.tokenizer.decode(ids) == text and dm.tokenizer.vocab_size == 33
