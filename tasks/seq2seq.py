"""Sequence-to-sequence: an encoder-decoder trained with teacher forcing, evaluated by decoding."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torchmetrics import MeanMetric
from torchmetrics.text import CharErrorRate

import zoo
from zoo.layers import token_cross_entropy

from .base import WeightedMean, ZooTask, check_label_smoothing
from .data.tokenizers import suppressed_ids, warn_unknown


def tokenizer_for(task) -> Any:
    """The tokenizer a task decodes with: its data module's, else the one restored from its checkpoint.

    Raises RuntimeError when neither exists.
    """
    datamodule = getattr(task._trainer, "datamodule", None) if task._trainer is not None else None
    tokenizer = getattr(datamodule, "tokenizer", None) or task.tokenizer
    if tokenizer is None:
        raise RuntimeError(f"{type(task).__name__} needs a tokenizer: train or evaluate it with a data module "
                           f"that has .tokenizer, or load it from a checkpoint written by one")
    return tokenizer


class Seq2Seq(ZooTask):
    """Trains a zoo encoder-decoder (seq2seq_tiny, transformer_base) on pairs of token sequences.

    Batches are dicts from tasks.data.parallel.Seq2SeqCollate: src_ids, src_mask, tgt_ids
    (B, S) and labels (B, S) (-100 on padding), plus source_text / target_text. Training
    minimizes teacher-forced cross-entropy; validation and test also decode (greedy, or
    beam search with num_beams > 1) and log exact_match (the fraction of outputs equal
    to the reference string) and cer (torchmetrics' character error rate).

    Args as ZooTask, plus:
        model: an encoder-decoder preset.
        vocab_size: source and target vocabulary of the model; at least the tokenizer's
            vocab_size (checked in setup). Explicit rather than linked from the data
            module so that it is in the hyperparameters and load_from_checkpoint
            rebuilds the model from the file alone.
        label_smoothing: cross-entropy label smoothing.
        num_beams: beams when decoding for the metrics (1: greedy).
        max_new_tokens: longest decoded output, in tokens.
    """

    monitor = ("val/exact_match", "max")  # what the best checkpoint is chosen by

    def __init__(self, model: str = "seq2seq_tiny", vocab_size: int = 128, label_smoothing: float = 0.0,
                 num_beams: int = 1, max_new_tokens: int = 64, model_args: Optional[dict[str, Any]] = None,
                 **kwargs):
        check_label_smoothing(label_smoothing)
        super().__init__(model, {"src_vocab_size": vocab_size, "tgt_vocab_size": vocab_size, **(model_args or {})},
                         **kwargs)
        self.tokenizer = None  # set in setup() from the data module, or from a checkpoint
        # The loss is a mean over the target tokens of the whole split (weighted by each batch's
        # count; a NaN batch makes it NaN rather than being dropped).
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": metric() for stage in ("val", "test")
            for name, metric in (("loss", WeightedMean), ("exact_match", MeanMetric), ("cer", CharErrorRate))})

    def setup(self, stage: str) -> None:
        super().setup(stage)
        tokenizer = tokenizer_for(self)
        vocab = min(self.model.cfg.src_vocab_size, self.model.cfg.tgt_vocab_size)
        if tokenizer.vocab_size > vocab:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                             f"{vocab}: set the task's vocab_size to at least {tokenizer.vocab_size}")
        self.tokenizer = tokenizer

    def forward(self, src_ids, tgt_ids, src_mask=None):
        """Teacher-forced logits (B, St, vocab)."""
        return self.model(src_ids, tgt_ids, src_mask=src_mask)

    def _loss(self, batch) -> torch.Tensor:
        logits = self.model(batch["src_ids"], batch["tgt_ids"], src_mask=batch["src_mask"])
        return token_cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                   self.model.cfg.decoder.kernel_ops, ignore_index=-100,
                                   label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["labels"]),
                 sync_dist=True)
        return loss

    def decode(self, src_ids: torch.Tensor, src_mask: Optional[torch.Tensor] = None, tokenizer=None,
               max_new_tokens: Optional[int] = None, num_beams: Optional[int] = None, **sampling) -> list[str]:
        """Decoded strings (B of them) for padded source ids (B, S): tokens up to the first eos.

        Only ids that are text to the tokenizer (and eos) are generated: never another special,
        nor an id past the tokenizer's vocabulary (the model's may be larger: 128 for 72 dates
        characters), which decoding would otherwise drop and so hide from exact match and CER.
        sampling: Seq2SeqTransformer.generate's do_sample, temperature, top_k, top_p, generator."""
        tokenizer = tokenizer or tokenizer_for(self)
        max_new_tokens = self.hparams.max_new_tokens if max_new_tokens is None else max_new_tokens
        num_beams = self.hparams.num_beams if num_beams is None else num_beams
        out = self.model.generate(src_ids, src_mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                  bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                                  suppress_tokens=suppressed_ids(tokenizer, self.model.cfg.tgt_vocab_size),
                                  **sampling)
        texts = []
        for row in out[:, 1:].tolist():
            if tokenizer.eos_id in row:
                row = row[:row.index(tokenizer.eos_id)]
            texts.append(tokenizer.decode(row))
        return texts

    def _evaluate(self, batch, stage: str) -> None:
        size = len(batch["labels"])
        loss = self.metrics[f"{stage}_loss"]
        loss.update(self._loss(batch), weight=(batch["labels"] != -100).sum())
        self.log(f"{stage}/loss", loss, prog_bar=True, on_epoch=True, batch_size=size)
        predictions = self.decode(batch["src_ids"], batch["src_mask"])
        references = batch["target_text"]
        exact = self.metrics[f"{stage}_exact_match"]
        exact.update(torch.tensor([p == r for p, r in zip(predictions, references)], dtype=torch.float32,
                                  device=self.device))
        cer = self.metrics[f"{stage}_cer"]
        cer.update(predictions, references)
        self.log(f"{stage}/exact_match", exact, prog_bar=True, on_epoch=True, batch_size=size)
        self.log(f"{stage}/cer", cer, on_epoch=True, batch_size=size)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx) -> list[dict]:
        """One record per source: source (its text, when the batch has it), prediction (the
        decoded string) and, with target texts, reference and correct (an exact match)."""
        predictions = self.decode(batch["src_ids"], batch["src_mask"])
        sources, references = batch.get("source_text"), batch.get("target_text")
        records = []
        for row, prediction in enumerate(predictions):
            record = {"source": sources[row]} if sources is not None else {}
            record["prediction"] = prediction
            if references is not None:
                record.update(reference=references[row], correct=prediction == references[row])
            records.append(record)
        return records

    def text_batch(self, sources: Sequence[str], tokenizer=None) -> dict:
        """{"src_ids", "src_mask"} (B, S), right-padded, for source strings (as generate_text encodes them).

        Raises ValueError for no source, an empty one, or one longer than the encoder's positions reach.
        """
        tokenizer = tokenizer or tokenizer_for(self)
        if isinstance(sources, str) or not sources:
            raise ValueError("sources must hold at least one string (a list of them, not one string)")
        warn_unknown(tokenizer, sources, "sources")
        ids = [tokenizer.encode(s) for s in sources]
        if any(not row for row in ids):
            raise ValueError("every source must have at least one token (got an empty string)")
        encoder = self.model.cfg.encoder
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        if encoder.positions in ("learned", "sinusoidal") and len(ids[longest]) > encoder.max_seq_len:
            # Said here, in the source's terms: the encoder would name a position of its table.
            which = "the source" if len(ids) == 1 else f"source {longest}"
            raise ValueError(f"{which} is {len(ids[longest])} tokens long; the model accepts at most "
                             f"{encoder.max_seq_len} (its encoder's max_seq_len)")
        src = torch.full((len(ids), max(map(len, ids))), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(src.shape, dtype=torch.bool)
        for i, row in enumerate(ids):
            src[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), True
        return {"src_ids": src.to(self.device), "src_mask": mask.to(self.device)}

    @torch.no_grad()
    def attention_figures(self, batch, tokenizer=None, sample: int = 0, layer: int = -1) -> dict:
        """The cross-attention alignment of block `layer` of the decoder (mean over heads): the model
        decodes sample `sample` greedily; row t is the step that produced output token t."""
        from .attention_figures import alignment
        from .text import token_labels

        tokenizer = tokenizer or tokenizer_for(self)
        src = batch["src_ids"][sample][batch["src_mask"][sample].bool()][None]
        out = self.model.generate(src, None, max_new_tokens=self.hparams.max_new_tokens, num_beams=1,
                                  bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                                  suppress_tokens=suppressed_ids(tokenizer, self.model.cfg.tgt_vocab_size)
                                  )[0].tolist()
        if tokenizer.eos_id in out[1:]:
            out = out[: out.index(tokenizer.eos_id, 1) + 1]
        depth = len(self.model.decoder.blocks)
        if not -depth <= layer < depth:
            raise ValueError(f"layer {layer} is out of range for a {depth}-block decoder")
        name = f"decoder.blocks.{layer % depth}.cross_attn"
        tgt = torch.tensor([out[:-1]], device=src.device)  # teacher-forced on the model's own output
        probs = zoo.attention_maps(self.model, (src, tgt), layers=[name])[name][0]
        source = token_labels(src[0].tolist(), tokenizer)
        title = f"{self.hparams.model}, {name}: {tokenizer.decode(src[0].tolist())!r} -> " \
                f"{tokenizer.decode([t for t in out[1:] if t != tokenizer.eos_id])!r}"
        return {"cross_attention": alignment(probs, source, token_labels(out[1:], tokenizer), title=title)}

    @torch.no_grad()
    def generate_text(self, sources: Sequence[str], tokenizer=None, max_new_tokens: Optional[int] = None,
                      num_beams: Optional[int] = None, temperature: float = 0.0, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, seed: Optional[int] = None) -> list[str]:
        """Outputs for source strings: tokenize (with `tokenizer`, else the task's), decode, detokenize.

        temperature 0 (the default, what validation measures) decodes greedily, or by beam search
        with num_beams > 1; above 0 it samples with temperature / top_k / top_p from a generator
        seeded with `seed` (None: unseeded), one beam only. Raises ValueError for an empty list,
        an empty source or one past the encoder's max_seq_len, a negative temperature, top_k or
        top_p without a temperature, sampling with num_beams > 1, or bad sampling options;
        RuntimeError without a tokenizer.
        """
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy decoding or beam search), got {temperature!r}")
        if temperature == 0 and (top_k is not None or top_p is not None):
            raise ValueError("top_k and top_p filter sampling: give a temperature > 0 with them")
        tokenizer = tokenizer or tokenizer_for(self)
        batch = self.text_batch(sources, tokenizer)
        src, mask = batch["src_ids"], batch["src_mask"]
        sampling = {}
        if temperature > 0:
            generator = torch.Generator(device=src.device).manual_seed(seed) if seed is not None else None
            sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        was_training = self.training
        self.eval()
        try:
            return self.decode(src, mask, tokenizer, max_new_tokens, num_beams, **sampling)
        finally:
            self.train(was_training)
