"""Speech tasks: keyword spotting (utterance classification) and CTC speech recognition."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torchmetrics.text import CharErrorRate, WordErrorRate

import zoo

from .base import ClassificationTask, ZooTask
from .seq2seq import tokenizer_for


def speech_figures(task: ZooTask, waveforms: torch.Tensor, lengths: Optional[torch.Tensor], sample: int,
                   layer: int, title: str) -> dict:
    """Self-attention over frames in block `layer` of sample `sample`, under its log-mel spectrogram."""
    from .attention_figures import speech_attention

    wave = waveforms[sample: sample + 1]
    if lengths is not None:
        wave = wave[:, : int(lengths[sample])]
    (name, probs), = zoo.attention_maps(task.model, (wave, None), layers=[layer]).items()
    log_mel, _ = task.model.log_mels(wave)
    return {"speech_attention": speech_attention(log_mel[0], probs[0], title=f"{title}, {name}")}


class AudioClassification(ClassificationTask):
    """Trains a zoo SpeechClassifier (speech_tiny, whisper_*_encoder with num_classes) with cross-entropy.

    Batches are (waveforms (B, T) at 16 kHz, lengths (B,) samples, labels (B,)); logs
    loss, top-1 accuracy (acc) and top-5 (acc_top5, or top-k for fewer classes).
    Args as ZooTask, plus num_classes and label_smoothing.
    """

    def __init__(self, model: str = "speech_tiny", num_classes: int = 12, label_smoothing: float = 0.0,
                 model_args: Optional[dict[str, Any]] = None, **kwargs):
        super().__init__(model, num_classes, label_smoothing, model_args, **kwargs)

    def forward(self, waveforms, lengths=None):
        """Class logits (B, num_classes)."""
        return self.model(waveforms, lengths)

    def logits_and_labels(self, batch):
        waveforms, lengths, labels = batch
        return self.model(waveforms, lengths), labels

    def predict_logits(self, batch):
        """Batches of (waveforms, lengths), or (waveforms, lengths, labels)."""
        return self.model(batch[0], batch[1]), (batch[2] if len(batch) > 2 else None)

    def attention_figures(self, batch, tokenizer=None, sample: int = 0, layer: int = -1) -> dict:
        """Self-attention over the frames of one clip (block `layer`, mean over heads) beside its log-mels."""
        waveforms, lengths, labels = batch
        return speech_figures(self, waveforms, lengths, sample, layer,
                              f"{self.hparams.model}: sample {sample} (label {int(labels[sample])})")


class SpeechRecognition(ZooTask):
    """Trains a zoo SpeechCTC (a speech encoder with a per-frame head) with the CTC loss.

    Batches are dicts (tasks.data.speech_corpora.TranscriptCollate): waveforms (B, T), lengths
    (B,), targets (B, L) symbol ids, target_lengths (B,), texts. Validation and test
    decode greedily (best path) and log cer and wer (torchmetrics) against the texts,
    detokenized with the data module's tokenizer (or the checkpoint's).

    Args as ZooTask, plus:
        vocab_size: output symbols including the blank; at least the tokenizer's
            vocab_size (checked in setup). Explicit so that load_from_checkpoint
            rebuilds the model from the file alone.
        blank_id: the CTC blank; 0, the tokenizers' pad id, which no transcript holds.
    """

    monitor = ("val/cer", "min")  # what the best checkpoint is chosen by

    def __init__(self, model: str = "whisper_base_encoder", vocab_size: int = 33, blank_id: int = 0,
                 model_args: Optional[dict[str, Any]] = None, **kwargs):
        super().__init__(model, {"num_classes": 0, "vocab_size": vocab_size, "blank_id": blank_id,
                                 **(model_args or {})}, **kwargs)
        self.tokenizer = None  # set in setup() from the data module, or from a checkpoint
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": metric() for stage in ("val", "test")
            for name, metric in (("cer", CharErrorRate), ("wer", WordErrorRate))})

    def setup(self, stage: str) -> None:
        super().setup(stage)
        tokenizer = tokenizer_for(self)
        if tokenizer.vocab_size > self.model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} symbols but the model's CTC head has "
                             f"{self.model.cfg.vocab_size}: set the task's vocab_size to at least "
                             f"{tokenizer.vocab_size}")
        blank = self.model.cfg.blank_id
        if blank == tokenizer.unk_id or tokenizer.num_specials <= blank < tokenizer.vocab_size:
            symbol = "<unk>" if blank == tokenizer.unk_id else repr(tokenizer.decode([blank]))
            raise ValueError(f"blank_id {blank} is the tokenizer's {symbol}, which transcripts hold: the CTC blank "
                             f"must be an id no transcript holds (0, the pad id, or one past the tokenizer's "
                             f"{tokenizer.vocab_size} ids)")
        self.tokenizer = tokenizer

    def forward(self, waveforms, lengths=None):
        """Per-frame logits (B, S, vocab_size)."""
        return self.model(waveforms, lengths)

    def _loss(self, batch, zero_infinity: bool = False) -> torch.Tensor:
        return self.model.ctc_loss(batch["waveforms"], batch["lengths"], batch["targets"], batch["target_lengths"],
                                   zero_infinity=zero_infinity)

    def too_short(self, batch) -> torch.Tensor:
        """How many utterances of a batch have fewer frames (after the stride-2 convolution) than
        CTC needs for their transcript: one per symbol, and a blank between repeated symbols."""
        tokens = (self.model.frontend.frames(batch["lengths"]) + 1) // 2
        targets, counts = batch["targets"], batch["target_lengths"].to(tokens.device)
        inside = torch.arange(max(targets.shape[1] - 1, 0), device=targets.device) < (counts - 1)[:, None]
        repeats = ((targets[:, 1:] == targets[:, :-1]) & inside).sum(1)
        return (tokens < counts + repeats).sum()

    def training_step(self, batch, batch_idx):
        # An utterance too short for its transcript has no alignment: its loss is inf and its
        # gradients NaN, which clipping would spread to every weight. It counts 0 instead, and
        # train/too_short counts such utterances (validation keeps the inf).
        loss = self._loss(batch, zero_infinity=True)
        size = len(batch["lengths"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size, sync_dist=True)
        self.log("train/too_short", self.too_short(batch).float(), on_step=False, on_epoch=True, reduce_fx="sum",
                 batch_size=size, sync_dist=True)
        return loss

    def transcribe(self, waveforms: torch.Tensor, lengths=None, tokenizer=None) -> list[str]:
        """Greedy CTC transcripts (B strings) of waveforms (B, T) with lengths (B,) samples."""
        tokenizer = tokenizer or tokenizer_for(self)
        # Only text and the blank: not another special, nor an id past the tokenizer's (vocab_size may be larger).
        blank, vocab = self.model.cfg.blank_id, self.model.cfg.vocab_size
        banned = [i for i in (*range(tokenizer.num_specials), *range(tokenizer.vocab_size, vocab)) if i != blank]
        return [tokenizer.decode(ids) for ids in self.model.greedy_decode(waveforms, lengths, suppress_tokens=banned)]

    def _evaluate(self, batch, stage: str) -> None:
        size = len(batch["lengths"])
        self.log(f"{stage}/loss", self._loss(batch), prog_bar=True, on_epoch=True, batch_size=size, sync_dist=True)
        predictions = self.transcribe(batch["waveforms"], batch["lengths"])
        for name in ("cer", "wer"):
            metric = self.metrics[f"{stage}_{name}"]
            metric.update(predictions, batch["texts"])
            self.log(f"{stage}/{name}", metric, prog_bar=name == "cer", on_epoch=True, batch_size=size)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx) -> list[dict]:
        """One record per utterance: prediction (the greedy transcript) and, when the batch
        has texts, reference and correct (an exact match)."""
        transcripts = self.transcribe(batch["waveforms"], batch["lengths"])
        references = batch.get("texts")
        if references is None:
            return [{"prediction": t} for t in transcripts]
        return [{"prediction": t, "reference": r, "correct": t == r} for t, r in zip(transcripts, references)]

    def attention_figures(self, batch, tokenizer=None, sample: int = 0, layer: int = -1) -> dict:
        """Self-attention over the frames of one utterance (block `layer`, mean over heads) beside its log-mels."""
        return speech_figures(self, batch["waveforms"], batch["lengths"], sample, layer,
                              f"{self.hparams.model}: sample {sample}")
