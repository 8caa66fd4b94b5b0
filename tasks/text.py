"""Language modelling: causal (GPT presets) and masked (BERT presets).

The model's vocabulary must match the tokenizer, which exists only once the data module
has fitted it on the training split (its setup). So `vocab_size=None` (the default)
defers the model: __init__ builds it on the meta device only to check the preset and its
overrides early (no memory, no init time), then leaves `self.model = None`; configure_model(),
which Lightning calls after the data module's setup, builds the real model with the
tokenizer's vocab_size and records that value in hparams. (None rather than the meta
placeholder: Lightning's teardown moves the module to the CPU even when setup failed, and
meta tensors cannot be moved, which would hide e.g. a missing data folder's FileNotFoundError.)
Checkpoints therefore carry vocab_size, and `load_from_checkpoint(path)` builds the right model
with no data module. A LightningCLI link could not do this: the value is known only after
setup, and the shared CLI serves tasks that have no tokenizer.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

import zoo
from zoo.layers import token_cross_entropy

from .base import WeightedMean, ZooTask
from .data.tokenizers import suppressed_ids, warn_unknown

IGNORE_INDEX = -100

_SPECIAL_NAMES = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")


def token_labels(ids: list[int], tokenizer) -> list[str]:
    """A readable label per token id: its text, the name of a special token, or the id itself."""
    if tokenizer is None:
        return [str(i) for i in ids]
    specials = getattr(tokenizer, "num_specials", len(_SPECIAL_NAMES))
    return [_SPECIAL_NAMES[i] if i < min(specials, len(_SPECIAL_NAMES)) else tokenizer.decode([i]) for i in ids]


class _LanguageModelTask(ZooTask):
    """A ZooTask whose model's vocabulary comes from the data module's tokenizer (module docstring).

    Subclasses define `_forward_logits(batch)`. Logs {stage}/loss (mean cross-entropy in
    nats: over the epoch's tokens for val and test; train/loss is each batch's token mean,
    its epoch value weighted by sequences, since a token count would cost a sync per step),
    {stage}/ppl = exp(loss), val/unigram_loss (the data module's
    unigram baseline, when it has one) and, for character- or byte-level tokenizers,
    {stage}/bpc or {stage}/bpb: the bits of all scored tokens over the characters (bytes)
    among them, so the cost of <bos>/<eos> labels is counted but they are not characters
    (<unk> stands for one character).
    """

    monitor = ("val/loss", "min")  # what the best checkpoint is chosen by

    def __init__(self, model: str, vocab_size: Optional[int], model_args: Optional[dict[str, Any]], **kwargs):
        if model_args and "vocab_size" in model_args:
            raise ValueError("set the task's vocab_size (or leave it None to take the tokenizer's), "
                             "not model_args['vocab_size']")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size <= 0):
            raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
        overrides = {**(model_args or {}), **({"vocab_size": vocab_size} if vocab_size is not None else {})}
        with torch.device("meta") if vocab_size is None else contextlib.nullcontext():
            super().__init__(model, overrides, **kwargs)
        if vocab_size is None:
            self.model = None  # built by configure_model (module docstring)
        # A batch whose loss is NaN makes the split's loss NaN (MeanMetric would drop it with a
        # warning, and a diverging model could look fine).
        self.loss_metrics = torch.nn.ModuleDict({stage: WeightedMean() for stage in ("val", "test")})
        # The fraction of scored labels that are characters (bytes), for bits per character.
        self.char_fractions = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        self.bits_name: Optional[str] = None  # "bpc" / "bpb" once the tokenizer is known

    def _datamodule_tokenizer(self):
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "tokenizer", None)

    def _build_model(self, vocab_size: int) -> None:
        hp = self.hparams
        overrides = {**(hp.model_args or {}), "vocab_size": vocab_size}
        if hp.backbone is not None:
            overrides["backbone"] = hp.backbone
        self.model = zoo.create_model(hp.model, **overrides)
        if hp.compile:
            self.model.compile(fullgraph=True)

    def _on_vocab_known(self, vocab_size: int) -> None:
        """Hook for metrics that need the vocabulary size."""

    def _built_model(self):
        """The zoo model; RuntimeError while it still waits for the tokenizer's vocab_size."""
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}: the model is not built yet (vocab_size=None is taken from "
                               f"the data module's tokenizer at fit/validate set-up): pass vocab_size or load a "
                               f"checkpoint")
        return self.model

    def configure_model(self) -> None:
        """Builds the deferred model from the data module's tokenizer; checks that a given vocab_size fits it.

        Raises ValueError when vocab_size is None and there is no tokenizer to take it
        from, or when the tokenizer has more ids than the model's vocabulary.
        """
        tokenizer = self._datamodule_tokenizer()
        if tokenizer is not None:
            kind = tokenizer.state().get("kind")
            self.bits_name = {"chars": "bpc", "bytes": "bpb"}.get(kind)
        if self.model is not None:
            if tokenizer is not None and tokenizer.vocab_size > self.hparams.vocab_size:
                raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                                 f"{self.hparams.vocab_size}")
            return
        if tokenizer is None:
            raise ValueError(f"{type(self).__name__}: vocab_size is None and the data module has no .tokenizer "
                             f"to take it from: pass vocab_size")
        self.hparams.vocab_size = tokenizer.vocab_size  # saved in checkpoints: load_from_checkpoint needs it
        self._build_model(tokenizer.vocab_size)
        self._on_vocab_known(tokenizer.vocab_size)
        self.record_parameter_dims()

    def _forward_logits(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over the scored tokens, their number, logits)."""
        logits = self._forward_logits(batch)
        labels = batch["labels"]
        # The model's loss op: tritonzoo's cross-entropy kernel unless the model says otherwise.
        total = token_cross_entropy(logits.flatten(0, -2), labels.flatten(), self.model.cfg.backbone.kernel_ops,
                                    ignore_index=IGNORE_INDEX, reduction="sum")
        count = (labels != IGNORE_INDEX).sum()
        # A batch with nothing to score (possible with tiny masked-LM batches) gives 0, not NaN.
        return total / count.clamp_min(1), count, logits

    #: Tokens drawn in an attention figure: beyond this, labels are unreadable. A longer input
    #: is cut to its first FIGURE_TOKENS tokens (fewer for a model with fewer positions; see
    #: _figure_input) before the maps are computed.
    FIGURE_TOKENS = 64

    def _frame(self, ids: list[int], tokenizer) -> list[int]:
        """Token ids as the model sees a document in training."""
        raise NotImplementedError

    def text_batch(self, texts: list[str], tokenizer) -> dict:
        """{"input_ids", "attention_mask"} (B, T), right-padded, of texts framed as in training
        (for `zoo attention-map --text`)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        warn_unknown(tokenizer, texts, "text_batch")
        encoded = [self._frame(tokenizer.encode(text), tokenizer) for text in texts]
        width = max(map(len, encoded))
        ids = torch.full((len(encoded), width), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(encoded):
            ids[row, :len(tokens)], mask[row, :len(tokens)] = torch.tensor(tokens), 1
        return {"input_ids": ids, "attention_mask": mask}

    def _figure_tokens(self) -> int:
        """FIGURE_TOKENS, or the model's max_seq_len when that is fewer."""
        return min(self.FIGURE_TOKENS, self._built_model().cfg.backbone.max_seq_len)

    def _figure_input(self, ids: torch.Tensor, tokenizer) -> torch.Tensor:
        return ids[: self._figure_tokens()]

    def attention_figures(self, batch: dict, tokenizer=None, sample: int = 0, layer: int = -1) -> dict:
        """Token x token heatmaps of block `layer` (per head and averaged) for the real tokens of
        sample `sample`, labelled with the tokens (ids when no tokenizer is given)."""
        from .attention_figures import token_heatmaps

        row = batch["input_ids"][sample]
        mask = batch.get("attention_mask")
        ids = row[: int(mask[sample].sum())] if mask is not None else row
        ids = self._figure_input(ids, tokenizer)[None]
        (name, probs), = zoo.attention_maps(self._built_model(), {"input_ids": ids}, layers=[layer]).items()
        labels = token_labels(ids[0].tolist(), tokenizer)
        title = f"{self.hparams.model}, {name}: {len(labels)} tokens (rows attend to columns)"
        return {"text_attention": token_heatmaps(probs[0], labels, title=title)}

    def training_step(self, batch, batch_idx):
        loss, _, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def _eval_step(self, batch, stage: str):
        loss, count, logits = self._loss(batch)
        # Weighted by tokens: the epoch value is the mean over tokens, not over batches.
        self.loss_metrics[stage].update(loss, weight=count)
        tokenizer = self._datamodule_tokenizer() if self.bits_name else None
        if tokenizer is not None:
            labels = batch["labels"]
            chars = ((labels >= tokenizer.num_specials) | (labels == tokenizer.unk_id)).sum()
            self.char_fractions[stage].update(chars / count.clamp_min(1), weight=count)
        return logits

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx) -> list[dict]:
        """One record per sequence (`zoo predict`, tasks.callbacks.PredictionWriter): tokens (how
        many it scores), loss (their mean cross-entropy, nats) and what `_prediction_text`
        adds: the text and the model's most likely token at each scored position, decoded
        with the data module's tokenizer (token ids without one)."""
        logits = self._forward_logits(batch).float()
        labels = batch["labels"]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                                   reduction="none")
        scored = labels != IGNORE_INDEX
        counts = scored.sum(dim=1)
        means = (losses.sum(dim=1) / counts.clamp_min(1)).tolist()
        tokenizer = self._datamodule_tokenizer()
        guesses = self._guesses(logits, tokenizer)
        mask = batch.get("attention_mask")
        records = []
        for row in range(labels.shape[0]):
            keep = mask[row].bool() if mask is not None else slice(None)
            record = self._prediction_text(batch["input_ids"][row][keep], labels[row][keep], guesses[row][keep],
                                           scored[row][keep], tokenizer)
            records.append({**record, "tokens": int(counts[row]), "loss": means[row]})
        return records

    @staticmethod
    def _guesses(logits: torch.Tensor, tokenizer) -> torch.Tensor:
        """The most likely id at each position among those the tokenizer has (all without one): a
        model's vocabulary may be padded past its tokenizer's, and those ids are never text."""
        return (logits if tokenizer is None else logits[..., :tokenizer.vocab_size]).argmax(dim=-1)

    def _prediction_text(self, ids: torch.Tensor, labels: torch.Tensor, guesses: torch.Tensor,
                         scored: torch.Tensor, tokenizer) -> dict:
        """The text fields of one sequence's prediction record (its real tokens only)."""
        raise NotImplementedError

    def _log_epoch(self, stage: str) -> None:
        loss = self.loss_metrics[stage].compute()
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/ppl", loss.exp())
        if self.bits_name:
            chars = self.char_fractions[stage].compute()
            if chars > 0:  # else no scored label is a character: bits per character is undefined
                self.log(f"{stage}/{self.bits_name}", loss / chars / math.log(2))
        baseline = getattr(getattr(self._trainer, "datamodule", None), "unigram_baseline", None)
        if stage == "val" and baseline is not None:
            self.log("val/unigram_loss", float(baseline))

    def _reset_metrics(self, stage: str) -> None:
        self.loss_metrics[stage].reset()
        self.char_fractions[stage].reset()

    # Reset at the start, not the end: the states are then made under the same grad mode as
    # the updates (inference mode in validate/test, no_grad in fit), which in-place updates need.
    def on_validation_epoch_start(self):
        self._reset_metrics("val")

    def on_test_epoch_start(self):
        self._reset_metrics("test")

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def on_test_epoch_end(self):
        self._log_epoch("test")


class CausalLM(_LanguageModelTask):
    """Next-token prediction with a zoo GPT preset.

    Batches: {"input_ids": (B, T), "labels": (B, T)}, labels already shifted (the token
    after each input; -100 = not scored), as LanguageModelDataModule makes them. Args:
        model: a GPT preset (gpt_nano, gpt2, ...).
        vocab_size: the model's vocabulary; None takes the tokenizer's (module docstring).
        model_args: preset overrides (depth, dim, max_seq_len, attn_backend, ...), not vocab_size.
        **kwargs: ZooTask's (lr, weight_decay, betas, warmup, min_lr_ratio, compile, backbone).
    Logs as _LanguageModelTask; monitor val/loss.
    """

    def __init__(self, model: str = "gpt_nano", vocab_size: Optional[int] = None,
                 model_args: Optional[dict[str, Any]] = None, **kwargs):
        super().__init__(model, vocab_size, model_args, **kwargs)

    def _frame(self, ids, tokenizer):
        return [tokenizer.bos_id] + ids  # a document's start, as in the training stream

    def forward(self, input_ids, attention_mask=None):
        """Next-token logits (B, T, vocab)."""
        return self.model(input_ids, attention_mask=attention_mask)

    def _forward_logits(self, batch):
        return self.model(batch["input_ids"], attention_mask=batch.get("attention_mask"))

    def _prediction_text(self, ids, labels, guesses, scored, tokenizer) -> dict:
        """text: the input; prediction: the model's next token after each scored position, as one string."""
        if tokenizer is None:
            return {"text": ids.tolist(), "prediction": guesses[scored].tolist()}
        return {"text": tokenizer.decode(ids.tolist()), "prediction": tokenizer.decode(guesses[scored].tolist())}

    @torch.no_grad()
    def generate_text(self, prompts: list[str], tokenizer, max_new_tokens: Optional[int] = None,
                      temperature: float = 0.8,
                      top_k: Optional[int] = None, top_p: Optional[float] = None,
                      seed: Optional[int] = None) -> list[str]:
        """Each prompt followed by its continuation, decoded up to the first <eos>.

        Prompts are encoded as <bos> + prompt (the start of a document, as in training) and
        left-padded into one batch for the model's KV-cached generate(). max_new_tokens None:
        200, or fewer where the model's learned/sinusoidal positions end sooner. temperature
        0 is greedy; otherwise sampling with temperature / top_k / top_p from a generator
        seeded with `seed` (None: unseeded). Raises TypeError for a single string, ValueError
        for a negative temperature, top_k or top_p at temperature 0, when the tokenizer does not
        fit the model, or what
        GPT.generate raises (prompt + max_new_tokens past max_seq_len, bad sampling options).
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy decoding), got {temperature!r}")
        if temperature == 0 and (top_k is not None or top_p is not None):  # not ignored without a word
            raise ValueError("top_k and top_p filter sampling: give a temperature > 0 with them")
        model = self._built_model()
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                             f"{model.cfg.vocab_size}")
        if not prompts:
            return []
        warn_unknown(tokenizer, prompts, "generate_text")
        encoded = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
        width = max(map(len, encoded))
        ids = torch.full((len(encoded), width), tokenizer.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(encoded):
            ids[row, width - len(tokens):] = torch.tensor(tokens, device=self.device)
            mask[row, width - len(tokens):] = 1
        if max_new_tokens is None:
            max_new_tokens = 200
            bb = model.cfg.backbone
            if bb.positions in ("learned", "sinusoidal"):  # the last new token is never fed back
                max_new_tokens = max(1, min(max_new_tokens, bb.max_seq_len - width + 1))
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        was_training = self.training
        self.eval()
        try:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                                      top_k=top_k, top_p=top_p, eos_token_id=tokenizer.eos_id,
                                      pad_token_id=tokenizer.pad_id, generator=generator,
                                      suppress_tokens=suppressed_ids(tokenizer, model.cfg.vocab_size))
        finally:
            self.train(was_training)
        texts = []
        for prompt, row in zip(prompts, out[:, width:].tolist()):
            if tokenizer.eos_id in row:
                row = row[:row.index(tokenizer.eos_id)]
            texts.append(prompt + tokenizer.decode(row))
        return texts


class MaskedLM(_LanguageModelTask):
    """Masked-token prediction with a zoo BERT preset (masked-LM head).

    Batches: {"input_ids", "attention_mask", "labels"} (B, S) as MaskedLMDataModule's
    collator makes them: labels hold the original id at the selected positions, -100
    elsewhere. Args as CausalLM (model: bert_tiny, bert_mini, bert_base, ...). Logs as
    _LanguageModelTask plus {stage}/acc: accuracy on the selected tokens; monitor val/loss.
    """

    def __init__(self, model: str = "bert_tiny", vocab_size: Optional[int] = None,
                 model_args: Optional[dict[str, Any]] = None, **kwargs):
        super().__init__(model, vocab_size, model_args, **kwargs)
        self.accuracy = None
        if vocab_size is not None:
            self._on_vocab_known(vocab_size)

    def _on_vocab_known(self, vocab_size: int) -> None:
        self.accuracy = torch.nn.ModuleDict({
            stage: MulticlassAccuracy(vocab_size, average="micro", ignore_index=IGNORE_INDEX)
            for stage in ("val", "test")})

    def _frame(self, ids, tokenizer):
        return [tokenizer.bos_id] + ids + [tokenizer.eos_id]  # one document piece, as MaskingCollator's items

    def _figure_input(self, ids, tokenizer):
        # Bidirectional: a cut sequence is another input, so it gets its own <eos> (maps are exact for it).
        keep = self._figure_tokens()
        if len(ids) <= keep:
            return ids
        eos = torch.full((1,), tokenizer.eos_id if tokenizer is not None else int(ids[-1]), dtype=ids.dtype,
                         device=ids.device)
        return torch.cat([ids[: keep - 1], eos])

    def forward(self, input_ids, attention_mask=None):
        """Logits (B, S, vocab) at every position."""
        return self.model(input_ids, attention_mask=attention_mask)

    def _forward_logits(self, batch):
        return self.model(batch["input_ids"], attention_mask=batch.get("attention_mask"))

    def _prediction_text(self, ids, labels, guesses, scored, tokenizer) -> dict:
        """text: the sequence before masking; masked: the tokens the model had to predict;
        prediction: its most likely token at each of them; matched: how many it got right."""
        original = torch.where(scored, labels, ids)
        record = {"matched": int((guesses[scored] == labels[scored]).sum())}
        if tokenizer is None:
            return {"text": original.tolist(), "masked": labels[scored].tolist(),
                    "prediction": guesses[scored].tolist(), **record}
        return {"text": tokenizer.decode(original.tolist()),
                "masked": [tokenizer.decode([i]) for i in labels[scored].tolist()],
                "prediction": [tokenizer.decode([i]) for i in guesses[scored].tolist()], **record}

    def _eval_step(self, batch, stage: str):
        logits = super()._eval_step(batch, stage)
        guesses = self._guesses(logits, self._datamodule_tokenizer())
        self.accuracy[stage].update(guesses.flatten(), batch["labels"].flatten())

    def _log_epoch(self, stage: str) -> None:
        super()._log_epoch(stage)
        self.log(f"{stage}/acc", self.accuracy[stage].compute(), prog_bar=stage == "val")

    def _reset_metrics(self, stage: str) -> None:
        super()._reset_metrics(stage)
        self.accuracy[stage].reset()

    @torch.no_grad()
    def fill_mask(self, texts: list[str], tokenizer, marker: str = "[MASK]") -> list[str]:
        """Each text with every `marker` replaced by the model's most likely regular token there
        (the rest of the text as written).

        A text is encoded as <bos> piece <mask> piece ... <eos> (as in training). Raises
        TypeError for a single string and ValueError for a text without the marker.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        model = self._built_model()
        warn_unknown(tokenizer, [text.replace(marker, "") for text in texts], "fill_mask")
        encoded = []
        for text in texts:
            pieces = text.split(marker)
            if len(pieces) < 2:
                raise ValueError(f"no {marker!r} in {text[:60]!r}")
            ids = [tokenizer.bos_id]
            for i, piece in enumerate(pieces):
                ids += ([tokenizer.mask_id] if i else []) + tokenizer.encode(piece)
            encoded.append(ids + [tokenizer.eos_id])
        width = max(map(len, encoded))
        ids = torch.full((len(encoded), width), tokenizer.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(encoded):
            ids[row, :len(tokens)] = torch.tensor(tokens, device=self.device)
            mask[row, :len(tokens)] = 1
        was_training = self.training
        self.eval()
        try:
            logits = model(ids, attention_mask=mask).float()
        finally:
            self.train(was_training)
        # A masked slot holds a regular token: not a special, not an id past the tokenizer's vocabulary.
        logits[..., :tokenizer.num_specials] = float("-inf")
        guesses = logits[..., :tokenizer.vocab_size].argmax(dim=-1)
        filled = []
        for text, row, tokens in zip(texts, guesses.tolist(), encoded):
            # The text around the markers is kept as written (the tokenizer may not spell all of it).
            fills = iter(tokenizer.decode([guess]) for guess, token in zip(row, tokens) if token == tokenizer.mask_id)
            pieces = text.split(marker)
            filled.append(pieces[0] + "".join(next(fills) + piece for piece in pieces[1:]))
        return filled
